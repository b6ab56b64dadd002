"""Prefill on vLLM: concurrent jobs batch in vLLM's scheduler; each layer's KV leaves as
frames while the next layer computes, in vLLM's own layout, sent by hetserve's connector from
each vLLM worker (every tensor-parallel rank its own stream, as native prefill ranks do).

vLLM's engine core runs in this process, built and stepped in one dedicated thread: the engine
is not thread-safe, and OpenMP's thread count is a per-thread setting that vLLM's CPU attention
checks between planning and running a step. Its workers are in this process too at tensor
parallel 1, vLLM's own worker processes above that. Every request asks for one token
(max_tokens=1): the first token, the TTFT; it then ends every rank's stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from proto.kv_descriptor import KVDescriptor
from proto.messages import PrefillJob
from services.backends.base import Announce, Load, Spawn
from services.backends.vllm import engine_args
from services.backends.vllm.kv_streams import StreamEnd
from services.common import metrics
from services.common.bus import Bus
from services.common.settings import WorkerSettings
from services.hf.tokenizer import Tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")


class VllmPrefill:
    engine_name = "vllm"

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.outputs: dict[str, asyncio.Future] = {}
        self.new: list[tuple[str, list[int], object]] = []
        self.aborted: list[str] = []
        self.ends: list[StreamEnd] = []  # for hetserve_end_streams, delivered before the next step
        self.wake = asyncio.Event()
        self.running = 0

    async def start(self, bus: Bus, spawn: Spawn) -> None:
        settings = self.settings
        engine_args.apply_threads(settings)
        engine_args.in_process_engine()
        self.engine_thread = ThreadPoolExecutor(1, thread_name_prefix="vllm-engine")
        self.cfg = await asyncio.to_thread(engine_args.check_model, settings)
        self.tokenizer = await asyncio.to_thread(Tokenizer.from_model_dir, settings.model)
        self.llm = await self._in_engine_thread(self._build_engine)
        ranks = await self._in_engine_thread(self.llm.collective_rpc, "hetserve_descriptor")
        self.kv: KVDescriptor = engine_args.rank_descriptors(ranks, settings.kv_layout)[0]
        self.num_blocks = self.llm.vllm_config.cache_config.num_gpu_blocks or 0
        self.max_model_len: int = self.llm.vllm_config.model_config.max_model_len
        self.device = str(self.llm.vllm_config.device_config.device)
        log.info(
            "%s: vLLM prefill, KV %s block %d tp %d (%s)",
            settings.instance_id, self.kv.layout, self.kv.block_size, self.kv.tp_size, self.kv.id,
        )  # fmt: skip
        spawn(self._engine_loop(), "vllm-steps", essential=True)

    async def _in_engine_thread(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.engine_thread, lambda: fn(*args, **kwargs))

    def _build_engine(self) -> Any:  # vllm.v1.engine.llm_engine.LLMEngine
        from vllm.v1.engine.llm_engine import LLMEngine

        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)  # this thread's OpenMP setting
        return LLMEngine.from_engine_args(engine_args.engine_args(self.settings, "prefill", False))

    def load(self) -> Load:
        # vLLM frees a prefill's blocks as it finishes: they are free between requests
        return Load(
            running=self.running,
            waiting=len(self.new),
            free_blocks=self.num_blocks,
            total_blocks=self.num_blocks,
            queued_tokens=sum(len(prompt) for _, prompt, _ in self.new),
            prefill_tokens_per_s=self.settings.expected_prefill_tokens_per_s,
        )

    # -- the engine thread ------------------------------------------------------------

    def _step(
        self, new: list[tuple[str, list[int], object]], aborted: list[str], ends: list[StreamEnd]
    ) -> tuple[list, dict[str, Exception]]:
        if aborted:
            self.llm.abort_request(aborted)
        if ends:  # every worker ends its rank's streams (rank 0's end has the first token)
            self.llm.collective_rpc("hetserve_end_streams", args=(ends,))
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
            if not (self.new or self.aborted or self.ends or self.llm.has_unfinished_requests()):
                self.wake.clear()
                await self.wake.wait()
                continue
            new, self.new = self.new, []
            aborted, self.aborted = self.aborted, []
            ends, self.ends = self.ends, []
            try:
                outputs, refused = await self._in_engine_thread(self._step, new, aborted, ends)
            except Exception as exc:  # noqa: BLE001 - fail what is in flight, keep serving
                log.exception("vLLM step failed")
                for rid in list(self.outputs):
                    self._settle(rid, exc)
                continue
            for rid, exc in refused.items():
                self._settle(rid, exc)
            for output in outputs:
                if output.finished:
                    self._settle(output.request_id, output)

    def _settle(self, rid: str, result: object) -> None:
        future = self.outputs.get(rid)
        if future is None or future.done():
            return
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)

    # -- one job ----------------------------------------------------------------------

    async def prefill(self, job: PrefillJob, announce: Announce) -> None:
        request, route = job.request, job.route
        rid = request.request_id
        if rid in self.outputs:
            raise RuntimeError(f"{rid} is already being prefilled here")
        seq = engine_args.new_sequence(request, self.cfg, self.tokenizer)
        output = self.outputs[rid] = asyncio.get_running_loop().create_future()
        route_dict = route.model_dump(mode="json")
        params = engine_args.sampling_params(
            request.sampling, 1, {"rid": rid, "produce": True, "route": route_dict}
        )
        self.new.append((rid, seq.context_ids, params))
        self.wake.set()
        self.running += 1
        error = ""
        try:
            with metrics.PREFILL_SECONDS.time():  # vLLM may batch it with others
                result = await output
            seq.num_cached = result.num_cached_tokens or 0  # vLLM's prefix cache
            seq.append(result.outputs[0].token_ids[0])
            await announce(seq)
        except BaseException as exc:
            error = f"prefill failed: {exc!r}"
            self.aborted.append(rid)  # vLLM is only touched from the engine thread
            raise
        finally:
            self.running -= 1
            self.outputs.pop(rid, None)
            # Every rank's stream gets its end: the first token, or the error.
            last = seq.output_ids[-1] if seq.output_ids else None
            end = StreamEnd(
                rid, route_dict, len(seq.context_ids), last, {"finished": seq.finished}, error
            )
            self.ends.append(end)
            self.wake.set()

    async def stop(self) -> None:
        self.engine_thread.shutdown(wait=False)
