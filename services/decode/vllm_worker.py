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
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from proto.layouts import KVDescriptor
from proto.messages import ErrorEvent, GenerateRequest, ReserveRequest
from services.common import metrics
from services.decode.receiver import KVReceiver
from services.decode.worker import DecodeService, Running
from services.engine import vllm_engine
from services.engine.hf_config import ModelConfig
from services.engine.kv_cache import BlockAllocator, PagedKVCache
from services.engine.sequence import Sequence
from services.engine.tokenizer import Tokenizer
from services.engine.vllm_staging import open_staging, staging_path

log = logging.getLogger(__name__)


@dataclass
class StagingArea:
    """What the shared decode logic sees of a vLLM instance: its KV descriptor and the staging
    cache that holds received KV until vLLM takes it (blocks of vLLM's own size)."""

    kv: KVDescriptor
    cache: PagedKVCache
    allocator: BlockAllocator
    max_model_len: int
    cfg: ModelConfig
    tokenizer: Tokenizer

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.kv.block_size)

    def new_sequence(self, request: GenerateRequest) -> Sequence:
        return vllm_engine.new_sequence(request, self.cfg, self.tokenizer)

    def release(self, request_ids: list[str]) -> None:
        """Only tensor-parallel native ranks hold per-request state elsewhere."""


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
        kv = vllm_engine.descriptor_from_ranks(ranks, self.settings.kv_layout)
        self.staging_file = staging_path(self.instance_id)
        num_blocks = self.settings.num_blocks
        cache = await asyncio.to_thread(open_staging, self.staging_file, kv, num_blocks, True)
        try:
            await self.vllm.collective_rpc("hetserve_attach_staging",
                                           args=(str(self.staging_file), num_blocks))
        finally:
            # Both processes have it mapped now: the name can go, so nothing is left behind
            # in /dev/shm however the processes end.
            self.staging_file.unlink(missing_ok=True)
        self.engine = StagingArea(
            kv=kv, cache=cache, allocator=BlockAllocator(num_blocks), cfg=cfg, tokenizer=tokenizer,
            max_model_len=self.vllm.vllm_config.model_config.max_model_len)
        self.receiver = KVReceiver(self.engine)
        self.tp = 1
        self.generating: dict[str, asyncio.Task] = {}
        log.info("%s: vLLM decode, KV %s block %d (%s), staging %s", self.instance_id,
                 kv.layout, kv.block_size, kv.id, self.staging_file)
        s = self.bus.subjects
        await self.subscribe(s.reserve(self.instance_id), self._on_reserve)
        await self.subscribe(s.kv_frames(self.instance_id, kv.tp_rank), self._on_frame)
        await self.subscribe(s.aborts, self._on_abort)
        self.spawn(self._expire_reservations(), "reservation-expiry")

    def _build_engine(self):  # noqa: ANN202 - vllm.v1.engine.async_llm.AsyncLLM
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(
            vllm_engine.engine_args(self.settings, "decode", True), stat_loggers=[PeakBatch])

    def status(self):  # noqa: ANN201
        info = super().status()
        info.engine = "vllm"
        info.running = len(self.generating)
        info.peak_running = PeakBatch.peak_running
        return info

    def _blocks_to_hold(self, req: ReserveRequest) -> int:
        """Staging holds the transferred context only; vLLM grows the sequence itself."""
        return self.engine.blocks_for(len(req.request.context_token_ids))

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
            seq.params, seq.params.max_tokens - seq.completion_offset - len(seq.output_ids),
            {"rid": rid, "staged_blocks": seq.block_table, "num_tokens": len(seq.context_ids)})
        try:
            async for out in self.vllm.generate({"prompt_token_ids": seq.all_ids}, params,
                                                request_id=rid):
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
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            log.exception("%s: vLLM decode of %s failed", self.instance_id, rid)
            await self.bus.publish(self.bus.subjects.request_events(rid), ErrorEvent(
                request_id=rid, message=f"decode failed: {exc}", instance_id=self.instance_id))
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
            await self.bus.publish(self.bus.subjects.request_events(rid), ErrorEvent(
                request_id=rid, instance_id=self.instance_id,
                message=f"{self.instance_id} is shutting down"))
        await asyncio.gather(*self.generating.values(), return_exceptions=True)
        self.vllm.shutdown()
