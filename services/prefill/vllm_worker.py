"""Prefill on vLLM: concurrent jobs batch in vLLM's scheduler; each layer's KV leaves as
frames while the next layer computes (through hetserve's connector), in vLLM's own layout.

vLLM runs in this process (engine core and worker, tensor parallel 1), built and stepped in
one dedicated thread: the engine is not thread-safe, and OpenMP's thread count is a per-thread
setting that vLLM's CPU attention checks between planning and running a step. Every request
asks for one token (max_tokens=1): the first token, the TTFT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from proto.layouts import KVDescriptor, payload_to_bytes
from proto.messages import PrefillJob
from services.common import metrics
from services.common.telemetry import tracer
from services.engine import vllm_engine
from services.engine.tokenizer import Tokenizer
from services.prefill.shard_stream import LAYERS_DONE, stream_shard
from services.prefill.worker import PrefillService

log = logging.getLogger(__name__)
_tracer = tracer("hetserve.prefill")
T = TypeVar("T")


@dataclass
class VllmFeed:
    """One request's frames as the connector saves them, and its vLLM output."""

    num_tokens: int
    output: asyncio.Future
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class VllmPrefillService(PrefillService):
    async def start(self) -> None:
        if self.settings.tp_size != 1:
            raise ValueError("a vLLM prefill runs at tp 1 only so far")
        vllm_engine.apply_threads(self.settings)
        vllm_engine.in_process_engine()
        self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="vllm-engine")
        self.cfg = await asyncio.to_thread(vllm_engine.check_model, self.settings)
        self.tokenizer = await asyncio.to_thread(Tokenizer.from_model_dir, self.settings.model)
        self.llm = await self._in_engine_thread(self._build_engine)
        ranks = await self._in_engine_thread(self.llm.collective_rpc, "hetserve_descriptor")
        self.kv: KVDescriptor = vllm_engine.descriptor_from_ranks(ranks, self.settings.kv_layout)
        self.num_blocks = self.llm.vllm_config.cache_config.num_gpu_blocks or 0
        self.loop = asyncio.get_running_loop()
        self.feeds: dict[str, VllmFeed] = {}
        self.new: list[tuple[str, list[int], object]] = []
        self.aborted: list[str] = []
        self.wake = asyncio.Event()
        from services.engine.vllm_connector import set_kv_sink

        per_frame = max(1, (self.bus.frame_limit - 1024) // self.kv.payload_nbytes(1))
        set_kv_sink(self._on_kv, per_frame)
        log.info("%s: vLLM prefill, KV %s block %d (%s)", self.instance_id, self.kv.layout,
                 self.kv.block_size, self.kv.id)
        await self.subscribe(self.bus.subjects.prefill_jobs(self.instance_id), self._on_job)
        self.spawn(self._take_jobs(), "prefill-jobs")
        self.spawn(self._engine_loop(), "vllm-steps")

    async def _in_engine_thread(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.engine_thread, fn, *args)

    def _build_engine(self):  # noqa: ANN202 - vllm.v1.engine.llm_engine.LLMEngine
        from vllm.v1.engine.llm_engine import LLMEngine

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)  # this thread's OpenMP setting
        return LLMEngine.from_engine_args(vllm_engine.engine_args(self.settings, "prefill", False))

    def status(self):  # noqa: ANN201
        info = super(PrefillService, self).status()
        info.model = self.settings.model
        info.kv = self.kv
        info.engine = "vllm"
        info.running = self.running
        info.waiting = self.jobs.qsize()
        info.total_blocks = self.num_blocks
        info.free_blocks = self.num_blocks  # vLLM frees a prefill's blocks as it finishes
        info.max_model_len = self.llm.vllm_config.model_config.max_model_len
        return info

    async def _take_jobs(self) -> None:
        """Jobs run concurrently: vLLM batches their prompts."""
        while True:
            job, ctx = await self.jobs.get()
            self.spawn(self._serve_job(job, ctx), f"prefill-{job.request.request_id}")

    # -- the engine thread ------------------------------------------------------------

    def _on_kv(self, rid: str, layer: int, start: int, stop: int,
               payload: dict[str, torch.Tensor]) -> None:
        """In vLLM's step (the engine thread): one frame's blocks, copied, to the stream."""
        feed = self.feeds.get(rid)
        if feed is not None:
            piece = (layer, [(start, stop, payload_to_bytes(payload))])
            self.loop.call_soon_threadsafe(feed.queue.put_nowait, piece)

    def _step(self, new: list[tuple[str, list[int], object]],
              aborted: list[str]) -> tuple[list, dict[str, Exception]]:
        if aborted:
            self.llm.abort_request(aborted)
        refused: dict[str, Exception] = {}
        for rid, prompt, params in new:
            try:
                self.llm.add_request(rid, {"prompt_token_ids": prompt}, params)
            except Exception as exc:  # noqa: BLE001 - one bad request fails alone
                refused[rid] = exc
        outputs = self.llm.step() if self.llm.has_unfinished_requests() else []
        return outputs, refused

    async def _engine_loop(self) -> None:
        while True:
            if not self.new and not self.aborted and not self.llm.has_unfinished_requests():
                self.wake.clear()
                await self.wake.wait()
                continue
            new, self.new = self.new, []
            aborted, self.aborted = self.aborted, []
            try:
                with metrics.PREFILL_SECONDS.time():
                    outputs, refused = await self._in_engine_thread(self._step, new, aborted)
            except Exception as exc:  # noqa: BLE001 - fail what is in flight, keep serving
                log.exception("%s: vLLM step failed", self.instance_id)
                for rid in list(self.feeds):
                    self._settle(rid, exc)
                continue
            for rid, exc in refused.items():
                self._settle(rid, exc)
            for output in outputs:
                if output.finished:
                    self._settle(output.request_id, output)

    def _settle(self, rid: str, result: object) -> None:
        """Every frame of `rid` is queued (saved during earlier steps): close its stream."""
        feed = self.feeds.get(rid)
        if feed is None or feed.output.done():
            return
        feed.queue.put_nowait(LAYERS_DONE)
        if isinstance(result, Exception):
            feed.output.set_exception(result)
        else:
            feed.output.set_result(result)

    # -- one job ----------------------------------------------------------------------

    async def _run(self, job: PrefillJob) -> None:
        request, route = job.request, job.route
        rid = request.request_id
        if rid in self.feeds:
            raise RuntimeError(f"{rid} is already being prefilled here")
        seq = vllm_engine.new_sequence(request, self.cfg, self.tokenizer)
        feed = VllmFeed(len(seq.context_ids), self.loop.create_future())
        self.feeds[rid] = feed
        params = vllm_engine.sampling_params(request.sampling, 1, {"rid": rid, "produce": True})
        self.new.append((rid, seq.context_ids, params))
        self.wake.set()

        async def announce() -> int:
            output = await feed.output
            seq.append(output.outputs[0].token_ids[0])
            await self._announce_first(job, seq)
            return seq.output_ids[-1]

        first = asyncio.ensure_future(announce())

        async def finish() -> tuple[int | None, dict]:
            return await first, {"finished": seq.finished}

        try:
            with _tracer.start_as_current_span("kv.send") as span:
                span.set_attribute("request.id", rid)
                span.set_attribute("kv.layout", self.kv.layout)
                span.set_attribute("kv.receiver", route.send_to)
                sender = await stream_shard(self.bus, self.settings, self.kv, rid, route, feed,
                                            finish)
                span.set_attribute("kv.bytes", sender.bytes_sent)
                span.set_attribute("kv.frames", sender.frames_sent)
        finally:
            if not feed.output.done():  # the stream failed first: vLLM need not go on
                self.aborted.append(rid)  # vLLM is only touched from the engine thread
                self.wake.set()
                self._settle(rid, RuntimeError("KV stream failed"))
            await asyncio.gather(first, return_exceptions=True)
            self.feeds.pop(rid, None)

    async def stop(self) -> None:
        from services.engine.vllm_connector import set_kv_sink

        set_kv_sink(None)
        self.engine_thread.shutdown(wait=False)
