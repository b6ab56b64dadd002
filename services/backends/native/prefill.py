"""Prefill on the native engine: concurrent jobs batch (and long prompts chunk) in the
engine's scheduler; after each layer of a step, every sequence's new blocks leave as frames
while the next layer computes. Rank 0's stream is sent from here; the other ranks' from their
own processes (prefill_rank.py), told where by the step they all run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from proto.kv_descriptor import KVDescriptor
from proto.messages import PrefillJob
from services.backends.base import Announce, Load, Spawn
from services.backends.native.build import build_engine
from services.common import metrics
from services.common.bus import Bus
from services.common.settings import WorkerSettings
from services.common.telemetry import tracer
from services.engine.engine import NativeEngine
from services.engine.scheduler import PrefillChunk, Scheduler
from services.engine.sequence import Sequence
from services.engine.speed import SpeedMeter
from services.engine.tp.leader import LeaderEngine
from services.kv.shard_stream import LayerFeed, receiver_rank, stream_shard

log = logging.getLogger(__name__)
_tracer = tracer("hetserve.prefill")


@dataclass
class _Prompt:
    seq: Sequence
    feed: LayerFeed
    job: PrefillJob
    computed: asyncio.Future  # the first token


class NativePrefill:
    engine_name = "native"

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.prompts: dict[str, _Prompt] = {}
        self.cancelled: set[str] = set()
        self._wake = asyncio.Event()
        self.running = 0
        self.speed = SpeedMeter(
            settings.expected_prefill_tokens_per_s, settings.expected_decode_step_s
        )

    async def start(self, bus: Bus, spawn: Spawn) -> None:
        self.bus = bus
        engine, world = await asyncio.to_thread(build_engine, self.settings)
        self.engine: NativeEngine = engine
        self.leader = await asyncio.to_thread(LeaderEngine, engine, world.control)
        self.scheduler = Scheduler(
            engine.blocks,
            self.settings.max_batch_size,
            self.settings.max_batched_tokens,
            decodes=False,
        )
        spawn(self._steps(), "prefill-steps", essential=True)

    @property
    def kv(self) -> KVDescriptor:
        return self.engine.kv

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def device(self) -> str:
        return str(self.engine.device)

    def load(self) -> Load:
        blocks = self.engine.blocks
        return Load(
            running=self.running,
            waiting=len(self.scheduler.waiting),
            free_blocks=blocks.num_free,
            total_blocks=blocks.num_total,
            cached_tokens=blocks.hits * blocks.block_size,
            cached_prefixes=blocks.cached_hashes(),
            queued_tokens=self.scheduler.queued_tokens,
            prefill_tokens_per_s=self.speed.prefill_tokens_per_s,
        )

    async def prefill(self, job: PrefillJob, announce: Announce) -> None:
        request, route, kv = job.request, job.route, self.engine.kv
        rid = request.request_id
        if rid in self.prompts:
            raise RuntimeError(f"{rid} is already being prefilled here")
        seq = self.engine.new_sequence(request)
        if len(seq.context_ids) > self.engine.max_model_len:
            raise ValueError(
                f"{len(seq.context_ids)} tokens exceed max_model_len {self.engine.max_model_len}"
            )
        if kv.blocks_for(len(seq.context_ids)) > self.engine.blocks.num_total:
            raise ValueError(
                f"{len(seq.context_ids)} tokens need more KV blocks than this instance has "
                f"({self.engine.blocks.num_total})"
            )
        feed = LayerFeed(
            kv, self.engine.cache.export_blocks, seq.block_table, len(seq.context_ids),
            self.bus.frame_limit, token_offset=route.token_offset,
        )  # fmt: skip
        prompt = _Prompt(seq, feed, job, asyncio.get_running_loop().create_future())
        self.prompts[rid] = prompt
        self.scheduler.add(seq)
        self._wake.set()
        self.running += 1

        async def first_token() -> int:
            token = await prompt.computed
            await announce(seq)
            return token

        compute = asyncio.ensure_future(first_token())

        async def finish() -> tuple[int | None, dict]:
            return await compute, {"finished": seq.finished}

        link = self.bus.kv_link(route.send_to, receiver_rank(kv, route))
        try:
            with _tracer.start_as_current_span("kv.send") as span:
                span.set_attribute("request.id", rid)
                span.set_attribute("kv.layout", kv.layout)
                span.set_attribute("kv.receiver", route.send_to)
                async with link:
                    await stream_shard(link, kv, rid, route, feed, finish)
                span.set_attribute("kv.bytes", link.bytes_sent)
                span.set_attribute("kv.frames", link.frames_sent)
        finally:
            if not prompt.computed.done():  # the stream failed first: drop the prompt
                self.cancelled.add(rid)
                self._wake.set()
            await asyncio.gather(compute, return_exceptions=True)
            self.prompts.pop(rid, None)
            self.running -= 1

    async def _steps(self) -> None:
        while True:
            self._drop_cancelled()
            plan = self.scheduler.schedule()
            if plan.empty:
                self._wake.clear()
                await self._wake.wait()
                continue
            chunks = plan.prefill
            extras = [self.prompts[c.seq.request_id].job.route.model_dump() for c in chunks]
            started = time.perf_counter()
            try:
                with metrics.PREFILL_SECONDS.time():
                    await asyncio.to_thread(self._step, chunks, extras)
            except Exception as exc:  # noqa: BLE001 - the step's prompts fail, others go on
                log.exception("a prefill step failed")
                for chunk in chunks:
                    self._fail(chunk.seq, f"prefill failed: {exc}")
                continue
            computed = sum(c.stop - c.start for c in chunks)
            self.speed.prefilled(computed, time.perf_counter() - started)
            done = self.scheduler.prefilled(chunks)
            self.scheduler.finish(done)  # every layer's KV was copied out in the step
            for seq in done:
                prompt = self.prompts.get(seq.request_id)
                if prompt is not None and not prompt.computed.done():
                    prompt.computed.set_result(seq.output_ids[-1])

    def _step(self, chunks: list[PrefillChunk], extras: list) -> None:
        self.leader.prefill_step(chunks, self._layer_hook(chunks), extras)
        if self.settings.step_delay_s:  # a benchmark's deliberately slow instance
            time.sleep(self.settings.step_delay_s)

    def _layer_hook(self, chunks: list[PrefillChunk]):  # noqa: ANN202 - a LayerDone
        feeds = [(self.prompts[c.seq.request_id].feed, c.stop) for c in chunks]

        def on_layer_done(layer: int) -> None:
            for feed, stop in feeds:
                feed.on_layer_done(layer, stop)

        return on_layer_done

    def _drop_cancelled(self) -> None:
        for rid in list(self.cancelled):
            self.cancelled.discard(rid)
            seq = self.scheduler.remove(rid)
            if seq is not None:
                self._fail(seq, "the KV stream failed")

    def _fail(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq.request_id)
        self.leader.release([seq.request_id])  # other ranks fail their streams of it
        prompt = self.prompts.get(seq.request_id)
        if prompt is not None:
            prompt.feed.fail(reason)
            if not prompt.computed.done():
                prompt.computed.set_exception(RuntimeError(reason))

    async def stop(self) -> None:
        await asyncio.to_thread(self.leader.stop)  # ends the follower ranks' loops
