"""Prefill worker: takes jobs from the scheduler and has its backend compute them; each
layer's KV streams to the decode side as it is done, and the first token goes straight to the
gateway (that is the TTFT), then with the end frame to the decode side, which continues from
it. The engine is a backend (services/backends); this file is only the bus side.
"""

from __future__ import annotations

import logging

from nats.aio.msg import Msg

from proto.messages import ErrorEvent, InstanceInfo, MessageError, PrefillJob, TokenEvent
from proto.prefix_hash import pack_hashes
from services.backends.base import PrefillBackend
from services.common import metrics
from services.common.service import Service
from services.common.settings import WorkerSettings
from services.common.telemetry import extract, tracer
from services.engine.sequence import Sequence
from services.kv.nats_link import StreamFailed

log = logging.getLogger(__name__)
_tracer = tracer("hetserve.prefill")


class PrefillService(Service):
    role = "prefill"
    moves_kv = True
    settings: WorkerSettings

    def __init__(self, settings: WorkerSettings, backend: PrefillBackend):
        super().__init__(settings)
        self.backend = backend

    async def start(self) -> None:
        await self.backend.start(self.bus, self.spawn)
        await self.subscribe(self.bus.subjects.prefill_jobs(self.instance_id), self._on_job)

    def status(self) -> InstanceInfo:
        info = super().status()
        load = self.backend.load()
        info.model = self.settings.model
        info.kv = self.backend.kv
        info.engine = self.backend.engine_name
        info.device = self.backend.device
        info.running = load.running
        info.waiting = load.waiting
        info.free_blocks = load.free_blocks
        info.total_blocks = load.total_blocks
        info.cached_prefixes = pack_hashes(load.cached_prefixes)
        info.queued_tokens = load.queued_tokens
        info.prefill_tokens_per_s = load.prefill_tokens_per_s
        info.max_model_len = self.backend.max_model_len
        return info

    async def _on_job(self, msg: Msg) -> None:
        try:
            job = PrefillJob.unpack(msg.data)
        except MessageError as exc:
            log.warning("rejected prefill job: %s", exc)
            metrics.error("prefill", "malformed_job")
            await msg.respond(b"rejected: " + str(exc).encode())
            return
        await msg.respond(b"ok")
        self.spawn(self._serve(job, extract(msg.headers)), f"prefill-{job.request.request_id}")

    async def _serve(self, job: PrefillJob, ctx: object) -> None:
        """One job, traced; a failure goes to the gateway as an error event."""
        request = job.request
        try:
            with _tracer.start_as_current_span("prefill.run", context=ctx) as span:
                span.set_attribute("request.id", request.request_id)
                span.set_attribute("prompt.tokens", len(request.context_token_ids))
                span.set_attribute("instance.id", self.instance_id)
                await self.backend.prefill(job, lambda seq: self._announce_first(job, seq))
        except Exception as exc:
            log.exception("prefill of %s failed", request.request_id)
            metrics.error("prefill", "prefill_failed")
            await self.bus.publish(
                job.events_subject,
                ErrorEvent(
                    request_id=request.request_id,
                    message=f"prefill failed: {exc}",
                    instance_id=culprit(exc, self.instance_id),
                ),
            )

    async def _announce_first(self, job: PrefillJob, seq: Sequence) -> None:
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
                cached_tokens=seq.num_cached,
            ),
        )

    async def stop(self) -> None:
        await self.backend.stop()


def culprit(exc: BaseException, own_id: str) -> str:
    """Whom a retry should avoid: the receiver a KV stream failed at (a converter or decode
    that died or refused), else this instance."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, StreamFailed) and seen.receiver:
            return seen.receiver
        seen = seen.__cause__ or seen.__context__
    return own_id
