"""Decode on vLLM: its async engine batches every running request and streams their tokens.

Reservations, frame checks and aborts are the native decode service's; what differs is where
the KV goes and who decodes. Frames land in a shared-memory staging cache laid out exactly
as vLLM's cache (the descriptor its workers read from their real tensors). When a stream
ends, the request enters vLLM with its context plus prefill's first token as the prompt;
hetserve's connector reports the context as already computed and copies the staged blocks
into the blocks vLLM allocated, so vLLM computes just the first token's KV and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from nats.aio.msg import Msg

from proto.frames import Frame
from proto.kv_descriptor import KVDescriptor
from proto.messages import ErrorEvent, GenerateRequest, ReserveRequest
from services.common import metrics
from services.decode.receiver import Inbound, KVReceiver
from services.decode.worker import DecodeService, Running
from services.engine import vllm_engine
from services.engine.block_manager import BlockAllocator
from services.engine.kv_cache import PagedKVCache
from services.engine.sequence import Sequence
from services.engine.vllm_staging import open_staging, staging_path
from services.hf.config import ModelConfig
from services.hf.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class RankStaging:
    """One tensor-parallel rank's staging cache, in that rank's descriptor."""

    kv: KVDescriptor
    cache: PagedKVCache

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.kv.block_size)


@dataclass
class Shard:
    """Rank r >= 1 of a vLLM instance at tensor parallel > 1: the streams of its heads arrive
    on their own subject (kv.<instance>.<r>) into their own staging cache, at the block ids
    rank 0 reserved."""

    staging: RankStaging
    receiver: KVReceiver
    inbound: dict[str, Inbound] = field(default_factory=dict)
    complete: set[str] = field(default_factory=set)


@dataclass
class StagingArea(RankStaging):
    """What the shared decode logic sees of a vLLM instance: rank 0's descriptor and staging
    cache (received KV waits there for vLLM, in blocks of vLLM's size), the other ranks'."""

    allocator: BlockAllocator
    max_model_len: int
    cfg: ModelConfig
    tokenizer: Tokenizer
    shards: list[Shard] = field(default_factory=list)

    def new_sequence(self, request: GenerateRequest) -> Sequence:
        return vllm_engine.new_sequence(request, self.cfg, self.tokenizer)

    def share_blocks(self, request_id: str, blocks: list[int]) -> None:
        for shard in self.shards:
            shard.inbound[request_id] = Inbound(blocks=blocks, deadline=float("inf"))

    def complete_everywhere(self, request_id: str) -> bool:
        return all(request_id in shard.complete for shard in self.shards)

    def release(self, request_ids: list[str]) -> None:
        for shard in self.shards:
            for rid in request_ids:
                shard.inbound.pop(rid, None)
                shard.complete.discard(rid)


class PeakBatch:
    """A vLLM stat logger: the largest batch its scheduler ran, and the prompt tokens it took
    from the connector (evidence the transferred KV was used, not recomputed)."""

    peak_running = 0

    def __init__(self, vllm_config: Any, engine_index: int = 0):
        pass

    def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
        if scheduler_stats is not None:
            PeakBatch.peak_running = max(PeakBatch.peak_running, scheduler_stats.num_running_reqs)

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


class VllmDecodeService(DecodeService):
    async def start(self) -> None:
        vllm_engine.apply_threads(self.settings)
        cfg = await asyncio.to_thread(vllm_engine.check_model, self.settings)
        tokenizer = await asyncio.to_thread(Tokenizer.from_model_dir, self.settings.model)
        self.vllm = await asyncio.to_thread(self._build_engine)
        ranks = await self.vllm.collective_rpc("hetserve_descriptor")
        descriptors = vllm_engine.rank_descriptors(ranks, self.settings.kv_layout)
        kv = descriptors[0]
        num_blocks = self.settings.num_blocks
        template = str(staging_path(self.instance_id, "{rank}"))
        files = [staging_path(self.instance_id, r) for r in range(kv.tp_size)]
        staging = [
            RankStaging(
                desc,
                await asyncio.to_thread(open_staging, files[desc.tp_rank], desc, num_blocks, True),
            )
            for desc in descriptors
        ]
        try:
            await self.vllm.collective_rpc("hetserve_attach_staging", args=(template, num_blocks))
        finally:
            # Every process has them mapped now: the names can go, so nothing is left behind
            # in /dev/shm however the processes end.
            for file in files:
                file.unlink(missing_ok=True)
        self.engine = StagingArea(
            kv=kv,
            cache=staging[0].cache,
            allocator=BlockAllocator(num_blocks),
            cfg=cfg,
            tokenizer=tokenizer,
            max_model_len=self.vllm.vllm_config.model_config.max_model_len,
            shards=[Shard(rank, KVReceiver(rank)) for rank in staging[1:]],
        )
        self.receiver = KVReceiver(self.engine)
        self.tp = kv.tp_size
        self.generating: dict[str, asyncio.Task] = {}
        self.shards_done: dict[str, asyncio.Event] = {}
        log.info(
            "%s: vLLM decode, KV %s block %d tp %d (%s)",
            self.instance_id,
            kv.layout,
            kv.block_size,
            kv.tp_size,
            kv.id,
        )
        s = self.bus.subjects
        await self.subscribe(s.reserve(self.instance_id), self._on_reserve)
        await self.subscribe(s.kv_frames(self.instance_id, 0), self._on_frame)
        for shard in self.engine.shards:
            await self.subscribe(
                s.kv_frames(self.instance_id, shard.staging.kv.tp_rank),
                partial(self._on_shard_frame, shard),
            )
        await self.subscribe(s.aborts, self._on_abort)
        self.spawn(self._expire_reservations(), "reservation-expiry")

    def _build_engine(self):  # noqa: ANN202 - vllm.v1.engine.async_llm.AsyncLLM
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(
            vllm_engine.engine_args(self.settings, "decode", True), stat_loggers=[PeakBatch]
        )

    def status(self):  # noqa: ANN201
        info = super().status()
        info.engine = "vllm"
        info.running = len(self.generating)
        info.peak_running = PeakBatch.peak_running
        return info

    def _blocks_to_hold(self, req: ReserveRequest) -> int:
        """Staging holds the transferred context only; vLLM grows the sequence itself."""
        return self.engine.blocks_for(len(req.request.context_token_ids))

    # -- tensor parallel > 1: the other ranks' streams ----------------------------------

    async def _on_shard_frame(self, shard: Shard, msg: Msg) -> None:
        await self._take_frame(
            msg, shard.receiver, shard.inbound, partial(self._shard_ended, shard)
        )

    def _shard_ended(
        self, shard: Shard, inbound: Inbound, frame: Frame, msg: Msg, complete: bool
    ) -> None:
        rid = frame.request_id
        del shard.inbound[rid]
        if not complete:  # its sender failed: the request cannot run here
            self.spawn(
                self._fail(
                    rid,
                    f"rank {shard.staging.kv.tp_rank}'s KV stream failed: "
                    f"{frame.extra.get('error', '')}",
                )
            )
            return
        shard.complete.add(rid)
        if self.engine.complete_everywhere(rid) and rid in self.shards_done:
            self.shards_done[rid].set()

    async def _all_ranks_ready(self, entry: Running) -> None:
        """Rank 0's stream is complete; wait for the other ranks' until the deadline."""
        rid = entry.seq.request_id
        if self.engine.complete_everywhere(rid):
            return
        done = self.shards_done.setdefault(rid, asyncio.Event())
        try:
            await asyncio.wait_for(done.wait(), max(0.0, entry.deadline - time.monotonic()))
        except TimeoutError:
            raise RuntimeError(f"{self.instance_id}: KV never completed on every rank") from None
        finally:
            self.shards_done.pop(rid, None)

    async def _fail(self, rid: str, message: str) -> None:
        task = self.generating.get(rid)
        if task is not None and rid not in self.inbound:  # failed on a rank >= 1 only
            task.cancel()
            await self.bus.publish(
                self.bus.subjects.request_events(rid),
                ErrorEvent(request_id=rid, message=message, instance_id=self.instance_id),
            )
        await super()._fail(rid, message)

    def _kv_loaded(self, num_tokens: int) -> None:
        """Counted when vLLM reports the tokens it took from the connector, not on arrival."""

    def _start(self, entry: Running) -> None:
        rid = entry.seq.request_id
        self.generating[rid] = self.spawn(self._generate(entry), f"vllm-decode-{rid}")

    async def _on_abort(self, msg: Msg) -> None:
        await super()._on_abort(msg)
        for rid, task in list(self.generating.items()):
            entry = self.by_id.get(rid)
            if entry is not None and entry.aborted:
                task.cancel()

    def _free_staging(self, seq: Sequence) -> None:
        self.engine.allocator.free(seq.block_table)
        seq.block_table = []

    async def _generate(self, entry: Running) -> None:
        seq = entry.seq
        rid = seq.request_id
        params = vllm_engine.sampling_params(
            seq.params,
            seq.params.max_tokens - seq.completion_offset - len(seq.output_ids),
            {"rid": rid, "staged_blocks": seq.block_table, "num_tokens": len(seq.context_ids)},
        )
        try:
            await self._all_ranks_ready(entry)
            async for out in self.vllm.generate(
                {"prompt_token_ids": seq.all_ids}, params, request_id=rid
            ):
                if seq.block_table:  # the connector copied them in the step that started it
                    self._free_staging(seq)
                    super()._kv_loaded(out.num_cached_tokens or 0)
                for token in out.outputs[0].token_ids:
                    seq.append(token)
                    metrics.DECODE_TOKENS.inc()
                    await self._publish_last_token(seq)
                    if seq.finished:
                        break
                if seq.finished:
                    break
            if not seq.finished:
                raise RuntimeError(f"vLLM ended {rid} after {len(seq.output_ids)} tokens")
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            log.exception("%s: vLLM decode of %s failed", self.instance_id, rid)
            await self.bus.publish(
                self.bus.subjects.request_events(rid),
                ErrorEvent(
                    request_id=rid, message=f"decode failed: {exc}", instance_id=self.instance_id
                ),
            )
        finally:
            # hetserve stopped it (stop string, EOS, abort) or it failed: vLLM lets it go too
            with contextlib.suppress(Exception):
                await self.vllm.abort(rid)
            self.generating.pop(rid, None)
            self._free_staging(seq)
            self._retire(entry)

    async def stop(self) -> None:
        for rid, task in list(self.generating.items()):
            task.cancel()
            await self.bus.publish(
                self.bus.subjects.request_events(rid),
                ErrorEvent(
                    request_id=rid,
                    instance_id=self.instance_id,
                    message=f"{self.instance_id} is shutting down",
                ),
            )
        await asyncio.gather(*self.generating.values(), return_exceptions=True)
        self.vllm.shutdown()
