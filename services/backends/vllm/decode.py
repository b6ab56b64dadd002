"""Decode on vLLM: its async engine batches every running request and streams their tokens.

The decode service's reservations, frame checks and aborts are engine-neutral; what is vLLM's
is where the KV goes and who decodes. Frames land in a shared-memory staging cache per
tensor-parallel rank, laid out exactly as vLLM's cache (the descriptor its workers read from
their real tensors). When every rank's stream has ended, the request enters vLLM with its
context plus prefill's first token as the prompt; hetserve's connector reports the context as
already computed and copies the staged blocks into the blocks vLLM allocated, so vLLM
computes just the first token's KV and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from proto.kv_descriptor import KVDescriptor
from proto.messages import GenerateRequest
from services.backends.base import DecodeEvents, Load, Spawn
from services.backends.vllm import engine_args
from services.backends.vllm.staging import open_staging, staging_path
from services.common import metrics
from services.common.bus import Bus
from services.common.settings import WorkerSettings
from services.engine.block_manager import BlockManager
from services.engine.kv_cache import PagedKVCache
from services.engine.sequence import Sequence
from services.hf.tokenizer import Tokenizer

log = logging.getLogger(__name__)


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


class VllmDecode:
    engine_name = "vllm"

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.generating: dict[str, tuple[Sequence, asyncio.Task]] = {}
        self.kv_loaded_tokens = 0

    async def start(self, bus: Bus, spawn: Spawn, events: DecodeEvents) -> None:
        settings, self.spawn, self.events = self.settings, spawn, events
        engine_args.apply_threads(settings)
        self.cfg = await asyncio.to_thread(engine_args.check_model, settings)
        self.tokenizer = await asyncio.to_thread(Tokenizer.from_model_dir, settings.model)
        self.vllm = await asyncio.to_thread(self._build_engine)
        ranks = await self.vllm.collective_rpc("hetserve_descriptor")
        descriptors = engine_args.rank_descriptors(ranks, settings.kv_layout)
        self.kv: KVDescriptor = descriptors[0]
        num_blocks = settings.num_blocks
        template = str(staging_path(settings.instance_id, "{rank}"))
        files = [staging_path(settings.instance_id, d.tp_rank) for d in descriptors]
        self.local_caches: dict[int, PagedKVCache] = {}
        for desc, file in zip(descriptors, files, strict=True):
            cache = await asyncio.to_thread(open_staging, file, desc, num_blocks, True)
            self.local_caches[desc.tp_rank] = cache
        try:
            await self.vllm.collective_rpc("hetserve_attach_staging", args=(template, num_blocks))
        finally:
            # Every process has them mapped now: the names can go, so nothing is left behind
            # in /dev/shm however the processes end.
            for file in files:
                file.unlink(missing_ok=True)
        self.staging = BlockManager(num_blocks, self.kv.block_size)
        self.max_model_len: int = self.vllm.vllm_config.model_config.max_model_len
        self.device = str(self.vllm.vllm_config.device_config.device)
        log.info(
            "%s: vLLM decode, KV %s block %d tp %d (%s)",
            settings.instance_id, self.kv.layout, self.kv.block_size, self.kv.tp_size, self.kv.id,
        )  # fmt: skip

    def _build_engine(self) -> Any:  # vllm.v1.engine.async_llm.AsyncLLM
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(
            engine_args.engine_args(self.settings, "decode", True), stat_loggers=[PeakBatch]
        )

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def load(self) -> Load:
        return Load(
            running=len(self.generating),
            free_blocks=self.staging.num_free,
            total_blocks=self.staging.num_total,
            peak_running=PeakBatch.peak_running,
            kv_loaded_tokens=self.kv_loaded_tokens,
            prefill_tokens_per_s=self.settings.expected_prefill_tokens_per_s,
            decode_step_s=self.settings.expected_decode_step_s,
        )

    def blocks_to_hold(self, request: GenerateRequest, num_tokens: int) -> int:
        """Staging holds the transferred context only; vLLM grows the sequence itself."""
        return self.kv.blocks_for(len(request.context_token_ids))

    async def reserve(
        self, request: GenerateRequest, count: int, align: int
    ) -> tuple[list[int], int]:
        # one block id on every rank's staging cache; vLLM loads every prompt token from it
        return self.staging.allocate(count), 0

    def release(self, request_id: str, blocks: list[int]) -> None:
        self.staging.free(blocks)

    def new_sequence(self, request: GenerateRequest) -> Sequence:
        return engine_args.new_sequence(request, self.cfg, self.tokenizer)

    async def start_sequence(self, seq: Sequence, deadline: float) -> None:
        task = self.spawn(self._generate(seq), f"vllm-decode-{seq.request_id}")
        self.generating[seq.request_id] = (seq, task)

    async def start_local(self, seq: Sequence) -> None:
        """vLLM prefills the prompt itself: no staged KV (the staging blocks go back now)."""
        self._free_staging(seq)
        task = self.spawn(self._generate(seq, local=True), f"vllm-local-{seq.request_id}")
        self.generating[seq.request_id] = (seq, task)

    def abort(self, request_id: str) -> None:
        entry = self.generating.get(request_id)
        if entry is not None:
            entry[1].cancel()

    def _free_staging(self, seq: Sequence) -> None:
        if seq.block_table:
            self.staging.free(seq.block_table)
            seq.block_table = []

    async def _generate(self, seq: Sequence, local: bool = False) -> None:
        rid = seq.request_id
        remaining = seq.params.max_tokens - seq.completion_offset - len(seq.output_ids)
        kv = {"rid": rid, "staged_blocks": seq.block_table, "num_tokens": len(seq.context_ids)}
        params = engine_args.sampling_params(seq.params, remaining, {} if local else kv)
        try:
            async for out in self.vllm.generate(
                {"prompt_token_ids": seq.all_ids}, params, request_id=rid
            ):
                if seq.block_table:  # the connector copied them in the step that started it
                    self._free_staging(seq)
                    loaded = out.num_cached_tokens or 0
                    self.kv_loaded_tokens += loaded
                    metrics.DECODE_KV_LOADED_TOKENS.inc(loaded)
                for token in out.outputs[0].token_ids:
                    seq.append(token)
                    metrics.DECODE_TOKENS.inc()
                    await self.events.tokens(seq)
                    if seq.finished:
                        break
                if seq.finished:
                    break
            if not seq.finished:
                raise RuntimeError(f"vLLM ended {rid} after {len(seq.output_ids)} tokens")
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            log.exception("vLLM decode of %s failed", rid)
            await self.events.failed(seq, f"decode failed: {exc}")
        finally:
            # hetserve stopped it (stop string, EOS, abort) or it failed: vLLM lets it go too
            with contextlib.suppress(Exception):
                await self.vllm.abort(rid)
            self.generating.pop(rid, None)
            self._free_staging(seq)

    async def stop(self) -> list[Sequence]:
        running = [seq for seq, _ in self.generating.values()]
        tasks = [task for _, task in self.generating.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.vllm.shutdown()
        return running
