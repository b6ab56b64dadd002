"""Prefill worker: runs a prompt layer by layer and streams each layer's KV as it is done.

The first token goes straight to the gateway (that is the TTFT), and with the end frame to
the decode side, which continues from it.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg

from proto.frames import Frame
from proto.layouts import payload_to_bytes
from proto.messages import ErrorEvent, MessageError, PrefillJob, TokenEvent
from services.common import metrics
from services.common.kv_stream import FrameSender
from services.common.service import Service
from services.common.settings import WorkerSettings
from services.common.telemetry import extract, tracer
from services.engine.engine import NativeEngine
from services.engine.factory import build_engine
from services.engine.kv_cache import OutOfBlocks

log = logging.getLogger(__name__)
_tracer = tracer("hetserve.prefill")

_LAYERS_DONE = object()


class PrefillService(Service):
    role = "prefill"
    settings: WorkerSettings

    def __init__(self, settings: WorkerSettings):
        super().__init__(settings)
        self.engine: NativeEngine
        self.jobs: asyncio.Queue[tuple[PrefillJob, object]] = asyncio.Queue()
        self.running = 0

    async def start(self) -> None:
        self.engine = await asyncio.to_thread(build_engine, self.settings)
        await self.subscribe(self.bus.subjects.prefill_jobs(self.instance_id), self._on_job)
        self.spawn(self._work_loop(), "prefill-loop")

    def status(self):  # noqa: ANN201
        info = super().status()
        info.model = self.settings.model
        info.kv = self.engine.kv
        info.engine = self.settings.engine
        info.running = self.running
        info.waiting = self.jobs.qsize()
        info.free_blocks = self.engine.allocator.num_free
        info.total_blocks = self.engine.allocator.num_total
        info.max_model_len = self.engine.max_model_len
        return info

    async def _on_job(self, msg: Msg) -> None:
        try:
            job = PrefillJob.unpack(msg.data)
        except MessageError as exc:
            log.warning("rejected prefill job: %s", exc)
            metrics.error("prefill", "malformed_job")
            await msg.respond(b"rejected: " + str(exc).encode())
            return
        await self.jobs.put((job, extract(msg.headers)))
        await msg.respond(b"ok")

    async def _work_loop(self) -> None:
        while True:
            job, ctx = await self.jobs.get()
            self.running = 1
            try:
                with _tracer.start_as_current_span("prefill.run", context=ctx) as span:
                    span.set_attribute("request.id", job.request.request_id)
                    span.set_attribute("prompt.tokens", len(job.request.context_token_ids))
                    span.set_attribute("instance.id", self.instance_id)
                    await self._run(job)
            except Exception as exc:
                log.exception("prefill of %s failed", job.request.request_id)
                metrics.error("prefill", "prefill_failed")
                await self.bus.publish(
                    job.events_subject,
                    ErrorEvent(request_id=job.request.request_id, message=f"prefill failed: {exc}",
                               instance_id=self.instance_id),
                )
            finally:
                self.running = 0

    async def _run(self, job: PrefillJob) -> None:
        engine, request = self.engine, job.request
        seq = engine.new_sequence(request)
        try:
            seq.block_table = engine.allocator.allocate(engine.blocks_for(len(seq.context_ids)))
        except OutOfBlocks as exc:
            raise RuntimeError(f"{self.instance_id}: {exc}") from exc
        try:
            await self._prefill_and_stream(job, seq)
        finally:
            engine.allocator.free(seq.block_table)

    async def _compute_and_announce(self, job: PrefillJob, seq, run) -> int:  # noqa: ANN001
        """Run the model in a thread; send the first token to the gateway the moment it exists."""
        with metrics.PREFILL_SECONDS.time():
            token = await asyncio.to_thread(run)
        metrics.PREFILL_REQUESTS.inc()
        metrics.PREFILL_TOKENS.inc(len(seq.context_ids))
        await self.bus.publish(job.events_subject, TokenEvent(
            request_id=job.request.request_id, index=len(job.request.resumed_token_ids),
            token_ids=[token], finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            instance_id=self.instance_id,
        ))
        return token

    async def _prefill_and_stream(self, job: PrefillJob, seq) -> None:  # noqa: ANN001
        engine, request = self.engine, job.request
        kv = engine.kv
        loop = asyncio.get_running_loop()
        layers: asyncio.Queue = asyncio.Queue()
        blocks_per_frame = max(1, (self.bus.frame_limit - 1024) // kv.payload_nbytes(1))
        num_tokens = len(seq.context_ids)

        def on_layer_done(layer: int) -> None:
            # In the torch thread: copy this layer's blocks out while the next layer runs.
            pieces = []
            for first in range(0, len(seq.block_table), blocks_per_frame):
                chunk = seq.block_table[first : first + blocks_per_frame]
                payload = payload_to_bytes(engine.cache.export_blocks(layer, chunk))
                start = first * kv.block_size
                stop = min(num_tokens, (first + len(chunk)) * kv.block_size)
                pieces.append((start, stop, payload))
            loop.call_soon_threadsafe(layers.put_nowait, (layer, pieces))

        def run() -> int:
            try:
                return engine.prefill(seq, on_layer_done)
            finally:
                loop.call_soon_threadsafe(layers.put_nowait, _LAYERS_DONE)

        route = job.route
        with _tracer.start_as_current_span("kv.send") as span:
            span.set_attribute("request.id", request.request_id)
            span.set_attribute("kv.layout", kv.layout)
            span.set_attribute("kv.receiver", route.send_to)
            # Direct: rank r of an identical decode instance takes rank r's shard.
            rank = 0 if route.via_converter else kv.tp_rank
            async with FrameSender(
                self.bus, route.send_to, self.settings.kv_window, self.settings.kv_ack_timeout_s,
                rank=rank,
            ) as sender:
                seq_no = 0
                await sender.send(Frame(
                    kind="begin", request_id=request.request_id, seq=seq_no, shard=kv.tp_rank,
                    layout_id=kv.id, descriptor=kv, num_tokens=num_tokens,
                    dest_instance=route.decode_instance if route.via_converter else "",
                    dest_descriptor=route.decode_kv,
                ))
                compute = asyncio.ensure_future(self._compute_and_announce(job, seq, run))
                data_frames = 0
                try:
                    while (item := await layers.get()) is not _LAYERS_DONE:
                        layer, pieces = item
                        for start, stop, payload in pieces:
                            seq_no += 1
                            data_frames += 1
                            await sender.send(Frame(
                                kind="data", request_id=request.request_id, seq=seq_no,
                                shard=kv.tp_rank, layout_id=kv.id, layer=layer,
                                token_start=start, token_stop=stop, payload=payload,
                            ))
                    first_token = await compute
                    extra = {"finished": seq.finished}
                except Exception as exc:
                    # The thread must be done with the blocks before they are freed.
                    await asyncio.gather(compute, return_exceptions=True)
                    # Tell the receiver now, so it frees the blocks it reserved.
                    first_token, extra = None, {"error": f"prefill failed: {exc}"}
                    await sender.send(Frame(
                        kind="end", request_id=request.request_id, seq=seq_no + 1,
                        shard=kv.tp_rank, layout_id=kv.id, data_frames=data_frames, extra=extra,
                    ))
                    raise
                await sender.send(Frame(
                    kind="end", request_id=request.request_id, seq=seq_no + 1, shard=kv.tp_rank,
                    layout_id=kv.id, data_frames=data_frames, first_token=first_token, extra=extra,
                ))
                await sender.finish()
                span.set_attribute("kv.bytes", sender.bytes_sent)
                span.set_attribute("kv.frames", sender.frames_sent)
