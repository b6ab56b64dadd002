"""Decode worker: reserves blocks, takes KV frames into them, has its backend decode, streams
the tokens to the gateway.

A request moves: reserved (blocks held, frames arriving on every local rank) -> decoding (the
backend's: batched with the others, one token per step) -> finished (blocks freed, a
completion record written). The engine behind it is a backend (services/backends): the
native engine or vLLM; this file is only the bus side.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from nats.aio.msg import Msg
from opentelemetry.trace import Span

from proto.frames import Frame, FrameError
from proto.messages import (
    AbortRequest,
    CompletionRecord,
    ErrorEvent,
    GenerateRequest,
    InstanceInfo,
    MessageError,
    ReserveReply,
    ReserveRequest,
    TokenEvent,
)
from proto.prefix_hash import pack_hashes
from services.backends.base import DecodeBackend
from services.common import metrics
from services.common.service import Service
from services.common.settings import WorkerSettings
from services.common.telemetry import extract, tracer
from services.decode.intake import RankIntake
from services.decode.reservations import Reservation, Reservations
from services.engine.block_manager import OutOfBlocks
from services.engine.sequence import Sequence
from services.kv.endpoint import Reply

log = logging.getLogger(__name__)
_tracer = tracer("hetserve.decode")


@dataclass
class Decoding:
    seq: Sequence
    request: GenerateRequest
    span: Span


class DecodeService(Service):
    role = "decode"
    moves_kv = True
    settings: WorkerSettings

    def __init__(self, settings: WorkerSettings, backend: DecodeBackend):
        super().__init__(settings)
        self.backend = backend
        self.reservations = Reservations()
        self.decoding: dict[str, Decoding] = {}

    async def start(self) -> None:
        backend = self.backend
        await backend.start(self.bus, self.spawn, self)
        self.intakes = {
            rank: RankIntake(backend.kv.model_copy(update={"tp_rank": rank}), cache)
            for rank, cache in backend.local_caches.items()
        }
        s = self.bus.subjects
        await self.subscribe(s.reserve(self.instance_id), self._on_reserve)
        for rank in self.intakes:
            endpoint = self.bus.kv_endpoint(
                f"{self.instance_id} rank {rank}",
                lambda frame, reply, rank=rank: self._on_frame(rank, frame, reply),
                self._on_rejected,
            )
            await self.subscribe(s.kv_frames(self.instance_id, rank), endpoint)
        await self.subscribe(s.aborts, self._on_abort)
        self.spawn(self._expire_reservations(), "reservation-expiry", essential=True)

    def status(self) -> InstanceInfo:
        info = super().status()
        load = self.backend.load()
        info.model = self.settings.model
        info.kv = self.backend.kv
        info.engine = self.backend.engine_name
        info.device = self.backend.device
        info.running = len(self.decoding)
        info.waiting = len(self.reservations) + load.waiting
        info.peak_running = load.peak_running
        info.preemptions = load.preemptions
        info.kv_loaded_tokens = load.kv_loaded_tokens
        info.cached_prefixes = pack_hashes(load.cached_prefixes)
        info.queued_tokens = load.queued_tokens
        info.prefill_tokens_per_s = load.prefill_tokens_per_s
        info.decode_step_s = load.decode_step_s
        info.local_prefill_max_tokens = self.settings.prefill_locally_below
        info.free_blocks = load.free_blocks
        info.total_blocks = load.total_blocks
        info.max_model_len = self.backend.max_model_len
        return info

    # -- reservation --------------------------------------------------------------------

    async def _on_reserve(self, msg: Msg) -> None:
        try:
            req = ReserveRequest.unpack(msg.data)
        except MessageError as exc:
            log.warning("rejected a reservation: %s", exc)
            metrics.error("decode", "malformed_reserve")
            await msg.respond(ReserveReply(ok=False, reason=str(exc)).pack())
            return
        reply = await self._reserve(req, msg)
        metrics.RESERVATIONS.labels("ok" if reply.ok else "refused").inc()
        await msg.respond(reply.pack())

    async def _reserve(self, req: ReserveRequest, msg: Msg) -> ReserveReply:
        rid, backend = req.request.request_id, self.backend
        if rid in self.reservations or rid in self.decoding:
            return ReserveReply(ok=False, reason=f"{rid} already held")
        if req.num_tokens > backend.max_model_len:
            reason = f"{req.num_tokens} tokens exceed max_model_len {backend.max_model_len}"
            return ReserveReply(ok=False, reason=reason)
        count = backend.blocks_to_hold(req.request, req.num_tokens)
        try:
            blocks, cached = await backend.reserve(req.request, count, req.token_align)
        except OutOfBlocks as exc:
            return ReserveReply(ok=False, reason=str(exc), retry_later=True)
        if req.local_prefill:
            await self._prefill_here(req, blocks, cached, msg)
            return ReserveReply(
                ok=True, free_blocks=backend.load().free_blocks, cached_tokens=cached
            )
        context = len(req.request.context_token_ids)
        span = _tracer.start_span(
            "decode.admit",
            context=extract(msg.headers),
            attributes={"request.id": rid, "instance.id": self.instance_id},
        )
        self.reservations.add(
            Reservation(
                request=req.request,
                blocks=blocks,
                deadline=time.monotonic() + req.hold_seconds,
                span=span,
                hold_s=req.hold_seconds,
                pending_ranks=set(self.intakes),
                cached_tokens=cached,
            )
        )
        for intake in self.intakes.values():
            intake.open(rid, context, cached)
        return ReserveReply(ok=True, free_blocks=backend.load().free_blocks, cached_tokens=cached)

    async def _prefill_here(
        self, req: ReserveRequest, blocks: list[int], cached: int, msg: Msg
    ) -> None:
        """Conditional disaggregation: no KV comes, this instance prefills the prompt itself
        (its cached prefix reused) and decodes on."""
        seq = self.backend.new_sequence(req.request)
        seq.block_table = blocks
        seq.num_computed = seq.num_cached = cached
        span = _tracer.start_span(
            "decode.generate",
            context=extract(msg.headers),
            attributes={
                "request.id": seq.request_id,
                "instance.id": self.instance_id,
                "prompt.tokens": len(seq.context_ids),
                "prefill.local": True,
            },
        )
        self.decoding[seq.request_id] = Decoding(seq, req.request, span)
        metrics.LOCAL_PREFILLS.inc()
        await self.backend.start_local(seq)

    def _release(self, rid: str) -> None:
        reservation = self.reservations.pop(rid)
        for intake in self.intakes.values():
            intake.close(rid)
        if reservation is not None:
            self.backend.release(rid, reservation.blocks)

    async def _fail_reservation(self, rid: str, message: str) -> None:
        if rid not in self.reservations:
            return
        self._release(rid)
        await self._error(rid, message)

    async def _expire_reservations(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for rid in self.reservations.expired():
                log.warning(
                    "%s: KV for %s never completed; releasing its blocks", self.instance_id, rid
                )
                metrics.error("decode", "kv_timeout")
                await self._fail_reservation(
                    rid, f"{self.instance_id}: KV transfer did not complete in time"
                )

    # -- KV frames ----------------------------------------------------------------------

    async def _on_frame(self, rank: int, frame: Frame, reply: Reply) -> None:
        reservation = self.reservations.get(frame.request_id)
        if reservation is None:
            raise FrameError(f"frame for unknown request {frame.request_id!r}")
        reader = await self.intakes[rank].take(frame, reservation.blocks)
        reservation.progressed()
        if frame.kind != "end":
            return
        if reader.error is not None:
            # The sender failed and told the gateway; just give the blocks back.
            self._release(frame.request_id)
            return
        if rank == 0:
            self._check_first_token(frame)
            reservation.first_token = frame.first_token
        reservation.pending_ranks.discard(rank)
        if not reservation.pending_ranks:
            await self._transfer_done(reservation, reply)

    def _check_first_token(self, frame: Frame) -> None:
        if frame.first_token is None:
            raise FrameError("end frame without the first token")
        if not 0 <= frame.first_token < self.backend.vocab_size:
            raise FrameError(f"first token {frame.first_token} outside the vocabulary")

    async def _on_rejected(self, request_id: str | None, reason: str) -> None:
        if request_id is not None:
            await self._fail_reservation(request_id, f"bad KV frame: {reason}")

    async def _transfer_done(self, reservation: Reservation, reply: Reply) -> None:
        """Every local rank holds the request's KV: it starts decoding."""
        rid, request = reservation.request_id, reservation.request
        self.reservations.pop(rid)
        for intake in self.intakes.values():
            intake.close(rid)
        seq = self.backend.new_sequence(request)
        seq.block_table = reservation.blocks
        seq.num_cached = reservation.cached_tokens
        assert reservation.first_token is not None
        seq.append(reservation.first_token)
        span = _tracer.start_span(
            "decode.generate",
            context=extract(reply.headers),
            attributes={
                "request.id": rid,
                "instance.id": self.instance_id,
                "prompt.tokens": len(seq.context_ids),
            },
        )
        entry = Decoding(seq, request, span)
        if seq.finished:  # the first token already ended it (EOS, max_tokens=1, stop)
            self.backend.release(rid, seq.block_table)
            seq.block_table = []
            self._retire(entry)
            return
        self.decoding[rid] = entry
        await self.backend.start_sequence(seq, reservation.deadline)

    # -- what the backend reports ---------------------------------------------------------

    async def tokens(self, seq: Sequence) -> None:
        prefilled_here = len(seq.output_ids) == 1  # the first token is decode's own
        await self.bus.publish(
            self.bus.subjects.request_events(seq.request_id),
            TokenEvent(
                request_id=seq.request_id,
                index=seq.completion_offset + len(seq.output_ids) - 1,
                token_ids=[seq.output_ids[-1]],
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                instance_id=self.instance_id,
                cached_tokens=seq.num_cached if prefilled_here else None,
            ),
        )
        if seq.finished:
            self._retire_id(seq.request_id)

    async def preempted(self, seq: Sequence) -> None:
        await self._error(
            seq.request_id,
            f"{self.instance_id} preempted it: out of KV blocks",
            exclude_instance=False,
        )
        self._retire_id(seq.request_id)

    async def failed(self, seq: Sequence, reason: str) -> None:
        await self._error(seq.request_id, f"{self.instance_id}: {reason}")
        self._retire_id(seq.request_id)

    async def _error(self, rid: str, message: str, exclude_instance: bool = True) -> None:
        await self.bus.publish(
            self.bus.subjects.request_events(rid),
            ErrorEvent(
                request_id=rid,
                message=message,
                instance_id=self.instance_id,
                exclude_instance=exclude_instance,
            ),
        )

    def _retire_id(self, rid: str) -> None:
        entry = self.decoding.pop(rid, None)
        if entry is not None:
            self._retire(entry)

    def _retire(self, entry: Decoding) -> None:
        seq = entry.seq
        entry.span.set_attribute("completion.tokens", len(seq.output_ids))
        entry.span.end()
        if not seq.finished:
            return
        metrics.DECODE_REQUESTS.inc()
        record = CompletionRecord(
            request_id=seq.request_id,
            prefill_instance="",
            decode_instance=self.instance_id,
            prompt_tokens=len(entry.request.prompt_token_ids),
            completion_tokens=seq.completion_offset + len(seq.output_ids),
            finish_reason=seq.finish_reason,
            finished_at=time.time(),
        )
        self.spawn(self.bus.js.publish(self.bus.subjects.completions, record.pack()))

    # -- aborts and shutdown ------------------------------------------------------------

    async def _on_abort(self, msg: Msg) -> None:
        try:
            abort = AbortRequest.unpack(msg.data)
        except MessageError as exc:
            log.warning("ignored an abort: %s", exc)
            metrics.error("decode", "malformed_abort")
            return
        rid = abort.request_id
        if rid in self.reservations:
            self._release(rid)
        entry = self.decoding.pop(rid, None)
        if entry is not None:
            self.backend.abort(rid)  # leaves the batch between steps, blocks freed
            self._retire(entry)

    async def stop(self) -> None:
        for seq in await self.backend.stop():
            await self._error(seq.request_id, f"{self.instance_id} is shutting down")
