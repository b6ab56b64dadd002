"""Decode worker: reserves blocks, takes KV frames into them, decodes in a continuous batch.

A request moves: reserved (blocks held, frames arriving) -> ready (KV complete, first
token known) -> running (in the batch, one token per step) -> finished (blocks freed).
Requests join and leave the running batch between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.msg import Msg
from opentelemetry.trace import Span

from proto.frames import Frame, FrameError, decode_frame
from proto.messages import (
    AbortRequest,
    CompletionRecord,
    ErrorEvent,
    GenerateRequest,
    MessageError,
    ReserveReply,
    ReserveRequest,
    TokenEvent,
)
from services.common import metrics
from services.common.kv_stream import acknowledge
from services.common.service import Service
from services.common.settings import WorkerSettings
from services.common.telemetry import extract, tracer
from services.decode.receiver import Inbound, KVReceiver
from services.engine.block_manager import OutOfBlocks
from services.engine.factory import build_engine
from services.engine.sequence import Sequence
from services.engine.tp_driver import LeaderEngine

log = logging.getLogger(__name__)
_tracer = tracer("hetserve.decode")


@dataclass
class Running:
    seq: Sequence
    request: GenerateRequest
    span: Span
    aborted: bool = False
    prefill_instance: str = ""
    deadline: float = 0.0  # to be ready on every TP rank


class DecodeService(Service):
    role = "decode"
    settings: WorkerSettings

    def __init__(self, settings: WorkerSettings):
        super().__init__(settings)
        self.engine: LeaderEngine
        self.inbound: dict[str, Inbound] = {}
        self.ready: deque[Running] = deque()
        self.running: list[Running] = []
        self.by_id: dict[str, Running] = {}
        self.peak_running = 0
        self.preempted = 0
        self.kv_loaded_tokens = 0
        self._wakeup = asyncio.Event()

    async def start(self) -> None:
        engine, world = await asyncio.to_thread(build_engine, self.settings)
        self.engine = await asyncio.to_thread(LeaderEngine, engine, world.control)
        self.receiver = KVReceiver(engine)
        self.tp = world.size
        s = self.bus.subjects
        await self.subscribe(s.reserve(self.instance_id), self._on_reserve)
        await self.subscribe(s.kv_frames(self.instance_id, self.engine.kv.tp_rank), self._on_frame)
        await self.subscribe(s.aborts, self._on_abort)
        self.spawn(self._decode_loop(), "decode-loop")
        self.spawn(self._expire_reservations(), "reservation-expiry")

    def status(self):  # noqa: ANN201
        info = super().status()
        info.model = self.settings.model
        info.kv = self.engine.kv
        info.engine = self.settings.engine
        info.running = len(self.running)
        info.waiting = len(self.ready) + len(self.inbound)
        info.peak_running = self.peak_running
        info.preemptions = self.preempted
        info.kv_loaded_tokens = self.kv_loaded_tokens
        info.free_blocks = self.engine.allocator.num_free
        info.total_blocks = self.engine.allocator.num_total
        info.max_model_len = self.engine.max_model_len
        return info

    # -- reservation --------------------------------------------------------------------

    async def _on_reserve(self, msg: Msg) -> None:
        try:
            req = ReserveRequest.unpack(msg.data)
        except MessageError as exc:
            await msg.respond(ReserveReply(ok=False, reason=str(exc)).pack())
            return
        rid = req.request.request_id
        if rid in self.inbound or rid in self.by_id:
            await msg.respond(ReserveReply(ok=False, reason=f"{rid} already held").pack())
            return
        if req.num_tokens > self.engine.max_model_len:
            reason = f"{req.num_tokens} tokens exceed max_model_len {self.engine.max_model_len}"
            metrics.RESERVATIONS.labels("refused").inc()
            await msg.respond(ReserveReply(ok=False, reason=reason).pack())
            return
        try:
            blocks = self.engine.allocator.allocate(self._blocks_to_hold(req))
        except OutOfBlocks as exc:
            metrics.RESERVATIONS.labels("refused").inc()
            await msg.respond(ReserveReply(ok=False, reason=str(exc), retry_later=True).pack())
            return
        if self.tp > 1:  # follower ranks import their shards into the same blocks
            await asyncio.to_thread(self.engine.share_blocks, rid, blocks)
        self.inbound[rid] = Inbound(
            request=req.request,
            blocks=blocks,
            deadline=time.monotonic() + req.hold_seconds,
            span=_tracer.start_span(
                "decode.admit",
                context=extract(msg.headers),
                attributes={"request.id": rid, "instance.id": self.instance_id},
            ),
        )
        metrics.RESERVATIONS.labels("ok").inc()
        await msg.respond(ReserveReply(ok=True, free_blocks=self.engine.allocator.num_free).pack())

    def _blocks_to_hold(self, req: ReserveRequest) -> int:
        """The prompt plus a stretch of output; more blocks are taken as it grows."""
        held = min(
            req.num_tokens, len(req.request.context_token_ids) + self.settings.reserve_ahead_tokens
        )
        return self.engine.blocks_for(held)

    def _release(self, rid: str) -> None:
        inbound = self.inbound.pop(rid, None)
        if inbound is not None:
            self.engine.release([rid])
            self.engine.allocator.free(inbound.blocks)
            if inbound.span is not None:
                inbound.span.end()

    async def _fail(self, rid: str, message: str) -> None:
        inbound = self.inbound.get(rid)
        self._release(rid)
        if inbound is not None:
            await self.bus.publish(
                self.bus.subjects.request_events(rid),
                ErrorEvent(request_id=rid, message=message, instance_id=self.instance_id),
            )

    async def _expire_reservations(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for rid in [r for r, i in self.inbound.items() if i.deadline < now]:
                log.warning(
                    "%s: KV for %s never completed; releasing its blocks", self.instance_id, rid
                )
                metrics.error("decode", "kv_timeout")
                await self._fail(rid, f"{self.instance_id}: KV transfer did not complete in time")

    # -- KV frames ----------------------------------------------------------------------

    async def _on_frame(self, msg: Msg) -> None:
        await self._take_frame(msg, self.receiver, self.inbound, self._transfer_ended)

    async def _take_frame(
        self,
        msg: Msg,
        receiver: KVReceiver,
        inbound_by_id: dict[str, Inbound],
        on_end: Callable[[Inbound, Frame, Msg, bool], None],
    ) -> None:
        """Check and store one frame of a stream this rank receives; ack it; a bad frame fails
        its request (every rank's blocks come back)."""
        try:
            frame = decode_frame(msg.data, self.bus.nc.max_payload)
        except FrameError as exc:
            log.warning(
                "%s rejected a KV frame of %s: %s",
                self.instance_id,
                exc.request_id or "an unknown request",
                exc,
            )
            await acknowledge(msg, False, str(exc))
            if exc.request_id in inbound_by_id:
                await self._fail(exc.request_id, f"bad KV frame: {exc}")
            return
        inbound = inbound_by_id.get(frame.request_id)
        if inbound is None:
            reason = f"frame for unknown request {frame.request_id!r}"
            log.warning("%s rejected a KV frame: %s", self.instance_id, reason)
            await acknowledge(msg, False, reason)
            return
        try:
            # The copy into the cache runs off the event loop (frames stay in order: this
            # subscription's handler is awaited frame by frame).
            complete = await asyncio.to_thread(receiver.take, inbound, frame)
            if frame.kind == "end":
                on_end(inbound, frame, msg, complete)
        except (FrameError, ValueError) as exc:
            log.warning("%s rejected a KV frame of %s: %s", self.instance_id, frame.request_id, exc)
            await acknowledge(msg, False, str(exc))
            await self._fail(frame.request_id, f"bad KV frame: {exc}")
            return
        await acknowledge(msg)

    def _transfer_ended(self, inbound: Inbound, frame: Frame, msg: Msg, complete: bool) -> None:
        rid = inbound.request.request_id
        if not complete:
            # The sender failed and told the gateway; just give the blocks back.
            self._release(rid)
            return
        if frame.first_token is None:
            raise FrameError("end frame without the first token")
        if not 0 <= frame.first_token < self.engine.cfg.vocab_size:
            raise FrameError(f"first token {frame.first_token} outside the vocabulary")
        del self.inbound[rid]
        if inbound.span is not None:
            inbound.span.end()
        seq = self.engine.new_sequence(inbound.request)
        seq.block_table = inbound.blocks
        self._kv_loaded(len(seq.context_ids))
        seq.append(frame.first_token)
        span = _tracer.start_span(
            "decode.generate",
            context=extract(msg.headers),
            attributes={
                "request.id": rid,
                "instance.id": self.instance_id,
                "prompt.tokens": len(seq.context_ids),
            },
        )
        entry = Running(seq=seq, request=inbound.request, span=span, deadline=inbound.deadline)
        if seq.finished:  # the first token already ended it (EOS, max_tokens=1, stop)
            self._retire(entry)
            return
        self.by_id[rid] = entry
        self._start(entry)

    def _kv_loaded(self, num_tokens: int) -> None:
        self.kv_loaded_tokens += num_tokens
        metrics.DECODE_KV_LOADED_TOKENS.inc(num_tokens)

    def _start(self, entry: Running) -> None:
        """A request whose KV is here joins the batch (between steps)."""
        self.ready.append(entry)
        self._wakeup.set()

    # -- the batch ----------------------------------------------------------------------

    async def _on_abort(self, msg: Msg) -> None:
        try:
            abort = AbortRequest.unpack(msg.data)
        except MessageError:
            return
        if abort.request_id in self.inbound:
            self._release(abort.request_id)
        entry = self.by_id.get(abort.request_id)
        if entry is not None:
            entry.aborted = True  # leaves the batch between steps
            self._wakeup.set()

    def _retire(self, entry: Running) -> None:
        self.by_id.pop(entry.seq.request_id, None)
        self.engine.release([entry.seq.request_id])
        self.engine.allocator.free(entry.seq.block_table)
        entry.seq.block_table = []
        entry.span.set_attribute("completion.tokens", len(entry.seq.output_ids))
        entry.span.end()
        if entry.seq.finished:
            metrics.DECODE_REQUESTS.inc()
            record = CompletionRecord(
                request_id=entry.seq.request_id,
                prefill_instance=entry.prefill_instance,
                decode_instance=self.instance_id,
                prompt_tokens=len(entry.request.prompt_token_ids),
                completion_tokens=entry.seq.completion_offset + len(entry.seq.output_ids),
                finish_reason=entry.seq.finish_reason,
                finished_at=time.time(),
            )
            self.spawn(self.bus.js.publish(self.bus.subjects.completions, record.pack()))

    def _drop_aborted(self) -> None:
        for entry in [e for e in (*self.running, *self.ready) if e.aborted]:
            self._retire(entry)
        self.running = [e for e in self.running if not e.aborted]
        self.ready = deque(e for e in self.ready if not e.aborted)

    async def _grow_or_preempt(self) -> None:
        """Give every running sequence a block for its next token; when none is left, the
        newest sequences give theirs back and are resumed elsewhere (or here, later) by the
        gateway with the tokens they already have: preemption by recomputation."""
        for entry in list(self.running):
            if entry not in self.running:  # preempted for an older one
                continue
            seq = entry.seq
            missing = self.engine.blocks_for(seq.num_tokens) - len(seq.block_table)
            while missing > 0 and self.engine.allocator.num_free < missing:
                victim = self.running[-1]
                self.running.remove(victim)
                self.preempted += 1
                await self.bus.publish(
                    self.bus.subjects.request_events(victim.seq.request_id),
                    ErrorEvent(
                        request_id=victim.seq.request_id,
                        instance_id=self.instance_id,
                        message=f"{self.instance_id} preempted it: out of KV blocks",
                        exclude_instance=False,
                    ),
                )
                self._retire(victim)
                if victim is entry:
                    break
            if entry in self.running and missing > 0:
                seq.block_table += self.engine.allocator.allocate(missing)

    async def _admit_ready(self) -> None:
        """Ready sequences join the batch, once every TP rank holds their KV."""
        room = self.settings.max_batch_size - len(self.running)
        candidates = list(self.ready)[:room]
        if not candidates:
            return
        if self.tp > 1:
            ids = await asyncio.to_thread(
                self.engine.ready_everywhere, [e.seq.request_id for e in candidates]
            )
            late = [
                e
                for e in candidates
                if e.seq.request_id not in ids and e.deadline < time.monotonic()
            ]
            for entry in late:
                self.ready.remove(entry)
                await self.bus.publish(
                    self.bus.subjects.request_events(entry.seq.request_id),
                    ErrorEvent(
                        request_id=entry.seq.request_id,
                        instance_id=self.instance_id,
                        message=f"{self.instance_id}: KV never completed on every rank",
                    ),
                )
                self._retire(entry)
            candidates = [e for e in candidates if e.seq.request_id in ids]
        for entry in candidates:
            self.ready.remove(entry)
            self.running.append(entry)

    async def _decode_loop(self) -> None:
        while True:
            self._drop_aborted()
            await self._admit_ready()
            if not self.running:
                self._wakeup.clear()
                # Ready sequences may be waiting for their KV on other TP ranks: poll.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), 0.005 if self.ready else None)
                continue
            await self._grow_or_preempt()
            if not self.running:
                continue
            self.peak_running = max(self.peak_running, len(self.running))
            batch = [e.seq for e in self.running]
            with metrics.DECODE_STEP_SECONDS.time():
                await asyncio.to_thread(self.engine.decode, batch)
            metrics.DECODE_TOKENS.inc(len(batch))
            still = []
            for entry in self.running:
                seq = entry.seq
                await self._publish_last_token(seq)
                if seq.finished:
                    self._retire(entry)
                else:
                    still.append(entry)
            self.running = still

    async def _publish_last_token(self, seq: Sequence) -> None:
        await self.bus.publish(
            self.bus.subjects.request_events(seq.request_id),
            TokenEvent(
                request_id=seq.request_id,
                index=seq.completion_offset + len(seq.output_ids) - 1,
                token_ids=[seq.output_ids[-1]],
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                instance_id=self.instance_id,
            ),
        )

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.stop)  # ends the follower ranks' loops
        for entry in list(self.running) + list(self.ready):
            await self.bus.publish(
                self.bus.subjects.request_events(entry.seq.request_id),
                ErrorEvent(
                    request_id=entry.seq.request_id,
                    instance_id=self.instance_id,
                    message=f"{self.instance_id} is shutting down",
                ),
            )
