"""Prefill worker: runs a prompt layer by layer and streams each layer's KV as it is done.

The first token goes straight to the gateway (that is the TTFT), and with the end frame to
the decode side, which continues from it.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg

from proto.messages import ErrorEvent, MessageError, PrefillJob, TokenEvent
from services.common import metrics
from services.common.service import Service
from services.common.settings import WorkerSettings
from services.common.telemetry import extract, tracer
from services.engine.block_manager import OutOfBlocks
from services.engine.factory import build_engine
from services.engine.tp_driver import LeaderEngine
from services.prefill.shard_stream import LayerFeed, stream_shard

log = logging.getLogger(__name__)
_tracer = tracer("hetserve.prefill")


class PrefillService(Service):
    role = "prefill"
    settings: WorkerSettings

    def __init__(self, settings: WorkerSettings):
        super().__init__(settings)
        self.engine: LeaderEngine
        self.jobs: asyncio.Queue[tuple[PrefillJob, object]] = asyncio.Queue()
        self.running = 0

    async def start(self) -> None:
        engine, world = await asyncio.to_thread(build_engine, self.settings)
        self.engine = await asyncio.to_thread(LeaderEngine, engine, world.control)
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
            await self._serve_job(*await self.jobs.get())

    async def _serve_job(self, job: PrefillJob, ctx: object) -> None:
        """One job, traced; a failure goes to the gateway as an error event."""
        self.running += 1
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
                ErrorEvent(
                    request_id=job.request.request_id,
                    message=f"prefill failed: {exc}",
                    instance_id=self.instance_id,
                ),
            )
        finally:
            self.running -= 1

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

    async def _compute_and_announce(self, job: PrefillJob, seq, feed: LayerFeed) -> int:  # noqa: ANN001
        """Run the model in a thread; send the first token to the gateway the moment it exists."""

        def run() -> int:
            try:
                # `extra` tells the follower ranks where to send their own shards' frames.
                return self.engine.prefill(seq, feed.on_layer_done, extra=job.route.model_dump())
            finally:
                feed.done()

        with metrics.PREFILL_SECONDS.time():
            token = await asyncio.to_thread(run)
        await self._announce_first(job, seq)
        return token

    async def _announce_first(self, job: PrefillJob, seq) -> None:  # noqa: ANN001
        """The first token (already appended to `seq`) to the gateway: that is the TTFT."""
        metrics.PREFILL_REQUESTS.inc()
        metrics.PREFILL_TOKENS.inc(len(seq.context_ids))
        await self.bus.publish(
            job.events_subject,
            TokenEvent(
                request_id=job.request.request_id,
                index=len(job.request.resumed_token_ids),
                token_ids=seq.output_ids[-1:],
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                instance_id=self.instance_id,
            ),
        )

    async def _prefill_and_stream(self, job: PrefillJob, seq) -> None:  # noqa: ANN001
        request, route, kv = job.request, job.route, self.engine.kv
        feed = LayerFeed(self.engine, seq.block_table, len(seq.context_ids), self.bus.frame_limit)
        compute = asyncio.ensure_future(self._compute_and_announce(job, seq, feed))

        async def finish() -> tuple[int | None, dict]:
            return await compute, {"finished": seq.finished}

        with _tracer.start_as_current_span("kv.send") as span:
            span.set_attribute("request.id", request.request_id)
            span.set_attribute("kv.layout", kv.layout)
            span.set_attribute("kv.receiver", route.send_to)
            try:
                sender = await stream_shard(
                    self.bus, self.settings, self.engine.kv, request.request_id, route, feed, finish
                )
            finally:
                # The torch thread must be done with the blocks before they are freed.
                await asyncio.gather(compute, return_exceptions=True)
            span.set_attribute("kv.bytes", sender.bytes_sent)
            span.set_attribute("kv.frames", sender.frames_sent)

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.stop)  # ends the follower ranks' loops
