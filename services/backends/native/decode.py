"""Decode on the native engine: continuous batching by the engine's scheduler.

Sequences whose KV arrived join the running batch between steps (at tensor parallel > 1 once
every rank holds their KV); each step decodes one token for the whole batch in a worker
thread; a sequence that needs a block when none is free is preempted (its blocks go back, the
service has it resumed elsewhere with the tokens it has: recomputation, as vLLM's).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from proto.kv_descriptor import KVDescriptor
from proto.messages import GenerateRequest
from services.backends.base import DecodeEvents, Load, Spawn
from services.backends.native.build import build_engine
from services.common import metrics
from services.common.bus import Bus
from services.common.settings import WorkerSettings
from services.engine.block_manager import OutOfBlocks
from services.engine.engine import NativeEngine
from services.engine.kv_cache import PagedKVCache
from services.engine.scheduler import PrefillChunk, Scheduler
from services.engine.sequence import Sequence
from services.engine.speed import SpeedMeter
from services.engine.tp.leader import LeaderEngine

T = TypeVar("T")


class NativeDecode:
    engine_name = "native"

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.ready: deque[tuple[Sequence, float]] = deque()  # KV here, waiting to join
        self.aborted: set[str] = set()
        self.peak_running = 0
        self.preemptions = 0
        self.kv_loaded_tokens = 0
        self.cached_tokens = 0  # context tokens reused from this cache instead of transferred
        self.speed = SpeedMeter(
            settings.expected_prefill_tokens_per_s, settings.expected_decode_step_s
        )
        self._wake = asyncio.Event()

    async def start(self, bus: Bus, spawn: Spawn, events: DecodeEvents) -> None:
        self.events = events
        engine, world = await asyncio.to_thread(build_engine, self.settings)
        self.engine: NativeEngine = engine
        self.leader = await asyncio.to_thread(LeaderEngine, engine, world.control)
        self.scheduler = Scheduler(
            engine.blocks, self.settings.max_batch_size, self.settings.max_batched_tokens
        )
        spawn(self._steps(), "decode-steps", essential=True)

    @property
    def kv(self) -> KVDescriptor:
        return self.engine.kv

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def device(self) -> str:
        return str(self.engine.device)

    @property
    def vocab_size(self) -> int:
        return self.engine.cfg.vocab_size

    @property
    def local_caches(self) -> dict[int, PagedKVCache]:
        return {self.engine.kv.tp_rank: self.engine.cache}

    def load(self) -> Load:
        blocks = self.engine.blocks
        return Load(
            running=len(self.scheduler.running),
            waiting=len(self.ready) + len(self.scheduler.waiting),
            free_blocks=blocks.num_free,
            total_blocks=blocks.num_total,
            peak_running=self.peak_running,
            preemptions=self.preemptions,
            kv_loaded_tokens=self.kv_loaded_tokens,
            cached_tokens=self.cached_tokens,
            cached_prefixes=blocks.cached_hashes(),
            queued_tokens=self.scheduler.queued_tokens,
            prefill_tokens_per_s=self.speed.prefill_tokens_per_s,
            decode_step_s=self.speed.decode_step_s,
        )

    def blocks_to_hold(self, request: GenerateRequest, num_tokens: int) -> int:
        """The context plus a stretch of output; more blocks are taken as it grows."""
        ahead = len(request.context_token_ids) + self.settings.reserve_ahead_tokens
        return self.engine.blocks_for(min(num_tokens, ahead))

    async def reserve(
        self, request: GenerateRequest, count: int, align: int
    ) -> tuple[list[int], int]:
        manager, context = self.engine.blocks, request.context_token_ids
        # a whole number of `align`-token runs, and never the last token: prefill computes it
        usable = (len(context) - 1) // align * align // manager.block_size
        run = max(align // manager.block_size, 1)  # align: the larger of both block sizes
        cached = manager.match_prefix(context, min(usable, count), multiple=run)
        try:
            blocks = cached + manager.allocate(count - len(cached))
        except OutOfBlocks:
            manager.free(cached)
            raise
        if self.leader.tp_size > 1:  # follower ranks import their shards into the same blocks
            await asyncio.to_thread(self.leader.share_blocks, request.request_id, blocks)
        return blocks, len(cached) * manager.block_size

    def release(self, request_id: str, blocks: list[int]) -> None:
        self.leader.release([request_id])
        self.engine.blocks.free(blocks)

    def new_sequence(self, request: GenerateRequest) -> Sequence:
        return self.engine.new_sequence(request)

    async def start_sequence(self, seq: Sequence, deadline: float) -> None:
        loaded = len(seq.context_ids) - seq.num_cached
        self.kv_loaded_tokens += loaded
        self.cached_tokens += seq.num_cached
        metrics.DECODE_KV_LOADED_TOKENS.inc(loaded)
        self.ready.append((seq, deadline))
        self._wake.set()

    async def start_local(self, seq: Sequence) -> None:
        self.scheduler.add(seq)  # prefill steps come first; then it joins the batch
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)
        self._wake.set()

    async def _steps(self) -> None:
        while True:
            self._drop_aborted()
            await self._admit_ready()
            plan = self.scheduler.schedule()
            for seq in plan.preempted:
                self.preemptions += 1
                self.leader.release([seq.request_id])
                await self.events.preempted(seq)
            if plan.prefill:
                await self._prefill(plan.prefill)
                continue
            if not plan.decode:
                self._wake.clear()
                # Ready sequences may be waiting for their KV on other TP ranks: poll.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.005 if self.ready else None)
                continue
            batch = plan.decode
            self.peak_running = max(self.peak_running, len(batch))
            started = time.perf_counter()
            with metrics.DECODE_STEP_SECONDS.time():
                await asyncio.to_thread(self._slowed, self.leader.decode, batch)
            self.speed.decoded(time.perf_counter() - started)
            metrics.DECODE_TOKENS.inc(len(batch))
            await self._report(batch)

    async def _prefill(self, chunks: list[PrefillChunk]) -> None:
        """Prompts prefilled here (local prefill): the first token of each done one."""
        started = time.perf_counter()
        try:
            with metrics.PREFILL_SECONDS.time():
                await asyncio.to_thread(self._slowed, self.leader.prefill_step, chunks)
        except Exception as exc:  # noqa: BLE001 - the step's prompts fail, others go on
            for chunk in chunks:
                self.scheduler.remove(chunk.seq.request_id)
                self.leader.release([chunk.seq.request_id])
                await self.events.failed(chunk.seq, f"prefill failed: {exc}")
            return
        self.speed.prefilled(sum(c.stop - c.start for c in chunks), time.perf_counter() - started)
        done = self.scheduler.prefilled(chunks)
        await self._report(done)

    def _slowed(self, step: Callable[..., T], *args: object) -> T:
        """A step, made slower by `step_delay_s` (a benchmark's deliberately slow instance)."""
        out = step(*args)
        if self.settings.step_delay_s:
            time.sleep(self.settings.step_delay_s)
        return out

    async def _report(self, seqs: list[Sequence]) -> None:
        """Each sequence's new token goes out; finished ones leave (the leader released them
        in a decode step; a sequence done at its first token is released here)."""
        finished = [seq for seq in seqs if seq.finished]
        self.scheduler.finish(finished)
        self.leader.release([seq.request_id for seq in finished])
        for seq in seqs:
            if seq.request_id not in self.aborted:
                await self.events.tokens(seq)

    def _drop_aborted(self) -> None:
        if not self.aborted:
            return
        for seq, _ in [entry for entry in self.ready if entry[0].request_id in self.aborted]:
            self.ready.remove((seq, _))
            self._let_go(seq)
        for rid in list(self.aborted):
            if self.scheduler.remove(rid) is not None:
                self.leader.release([rid])
        self.aborted.clear()

    def _let_go(self, seq: Sequence) -> None:
        self.release(seq.request_id, seq.block_table)
        seq.block_table = []

    async def _admit_ready(self) -> None:
        """Ready sequences join the batch, once every TP rank holds their KV."""
        room = self.settings.max_batch_size - len(self.scheduler.running)
        candidates = list(self.ready)[: max(room, 0)]
        if not candidates:
            return
        joining = candidates
        if self.leader.tp_size > 1:
            ids = set(
                await asyncio.to_thread(
                    self.leader.ready_everywhere, [seq.request_id for seq, _ in candidates]
                )
            )
            joining = [entry for entry in candidates if entry[0].request_id in ids]
            for entry in candidates:
                seq, deadline = entry
                if seq.request_id not in ids and deadline < time.monotonic():
                    self.ready.remove(entry)
                    self._let_go(seq)
                    await self.events.failed(seq, "KV never completed on every rank")
        for entry in joining:
            self.ready.remove(entry)
            self.scheduler.add_running(entry[0])

    async def stop(self) -> list[Sequence]:
        await asyncio.to_thread(self.leader.stop)  # ends the follower ranks' loops
        return [*self.scheduler.running, *(seq for seq, _ in self.ready)]
