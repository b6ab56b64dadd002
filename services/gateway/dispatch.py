"""The gateway's side of the bus: submit a request, follow its events, retry when an
instance dies, abort when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import nats.errors
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from proto.messages import (
    ROLES,
    AbortRequest,
    ErrorEvent,
    GenerateRequest,
    MessageError,
    RouteEvent,
    TokenEvent,
    unpack_request_event,
)
from services.common import metrics
from services.common.bus import Bus
from services.common.registry import Registry
from services.common.settings import GatewaySettings
from services.common.telemetry import inject, tracer
from services.gateway.backend import GenerationError

log = logging.getLogger(__name__)
_tracer = tracer("hetserve.gateway")

_LIVENESS_CHECK_S = 0.5
_MAX_RETRIES = 10
_SUBMIT_RETRY_S = 10.0  # a JetStream cluster elects a stream's new leader in a few seconds


class _Retry(Exception):
    def __init__(self, reason: str, dead: list[str]):
        super().__init__(reason)
        self.dead = dead


class NatsBackend:
    def __init__(
        self,
        bus: Bus,
        registry: Registry,
        settings: GatewaySettings,
        model_name: str,
        max_model_len: int,
    ):
        self.bus = bus
        self.registry = registry
        self.settings = settings
        self.model_name = model_name
        self.max_model_len = max_model_len

    def live_roles(self) -> dict[str, int]:
        counts = {role: 0 for role in ROLES}
        for info in self.registry.live():
            counts[info.role] += 1
        counts["gateway"] = max(counts["gateway"], 1)  # this one is answering
        return counts

    def missing_roles(self) -> list[str]:
        live = self.registry.live()
        prefills = [i for i in live if i.role == "prefill" and i.kv is not None]
        decodes = [i for i in live if i.role == "decode" and i.kv is not None]
        have = {i.role for i in live} | {"gateway"}
        if any(d.local_prefill_max_tokens > 0 for d in decodes):
            have.add("prefill")
        converted = any(
            not p.kv.same_kv_as(d.kv) for p in prefills for d in decodes if p.kv and d.kv
        )
        if not converted:
            have.add("converter")
        return [role for role in ROLES if role not in have]

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        with (
            _tracer.start_as_current_span("gateway.request") as span,
            metrics.track_request(len(request.prompt_token_ids)) as tracked,
        ):
            span.set_attribute("request.id", request.request_id)
            span.set_attribute("prompt.tokens", len(request.prompt_token_ids))
            produced: list[int] = []
            excluded: list[str] = []
            attempt = failures = 0
            while True:
                attempt_request = request.model_copy(
                    update={
                        "request_id": request.request_id
                        if attempt == 0
                        else f"{request.request_id}-r{attempt}",
                        "resumed_token_ids": list(produced),
                        "attempt": attempt,
                        "excluded_instances": list(excluded),
                        "submitted_at": time.time(),
                    }
                )
                try:
                    # aclosing: a client that leaves closes the attempt now, which aborts it.
                    async with contextlib.aclosing(self._attempt(attempt_request)) as events:
                        async for event in events:
                            produced.extend(event.token_ids)
                            tracked.delivered(event)
                            yield event
                    span.set_attribute("completion.tokens", len(produced))
                    return
                except _Retry as retry:
                    attempt += 1
                    excluded.extend(retry.dead)
                    metrics.RETRIES.inc()
                    # A preemption names no culprit and is not a failure, but is bounded too.
                    failures += bool(retry.dead)
                    if failures >= self.settings.max_attempts or attempt > _MAX_RETRIES:
                        raise GenerationError(
                            f"request failed after {attempt} attempts: {retry}"
                        ) from None
                    log.warning("retrying %s (attempt %d): %s", request.request_id, attempt, retry)

    async def _attempt(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        rid = request.request_id
        events: asyncio.Queue = asyncio.Queue()

        async def on_event(msg) -> None:  # noqa: ANN001
            try:
                events.put_nowait(unpack_request_event(msg.data))
            except MessageError as exc:
                log.warning("bad event for %s: %s", rid, exc)
                metrics.error("gateway", "malformed_event")

        sub = await self.bus.nc.subscribe(self.bus.subjects.request_events(rid), cb=on_event)
        finished = False
        try:
            await self._submit(request)
            route: RouteEvent | None = None
            routed_to: dict[str, float] = {}  # the route's instances: when each one started
            pending: dict[int, TokenEvent] = {}
            next_index = len(request.resumed_token_ids)
            first_deadline = time.monotonic() + self.settings.first_token_timeout_s
            deadline = first_deadline
            gap_since: float | None = None  # when a later event came with next_index missing
            while not finished:
                self._check_gap(rid, next_index, gap_since)
                try:
                    event = await asyncio.wait_for(events.get(), _LIVENESS_CHECK_S)
                except TimeoutError:
                    decoding = next_index > len(request.resumed_token_ids) + 1
                    self._check_alive(route, routed_to, decoding)
                    if time.monotonic() > deadline:
                        raise GenerationError(
                            f"request {rid} timed out waiting for tokens", 504, "timeout"
                        ) from None
                    continue
                if isinstance(event, RouteEvent):
                    route = event
                    routed_to = self._started_at(route)
                elif isinstance(event, ErrorEvent):
                    if event.retryable:
                        avoid = event.instance_id if event.exclude_instance else ""
                        raise _Retry(event.message, [avoid] if avoid else [])
                    raise GenerationError(event.message)
                elif event.index >= next_index:  # below: a repeat of delivered tokens
                    pending[event.index] = event
                    while next_index in pending:
                        ready = pending.pop(next_index)
                        next_index += len(ready.token_ids)
                        deadline = time.monotonic() + self.settings.token_timeout_s
                        finished = ready.finish_reason is not None
                        yield ready
                        if finished:
                            break
                    gap_since = (gap_since or time.monotonic()) if pending else None
        finally:
            await sub.unsubscribe()
            if not finished:
                # Client gone, retry, or failure: whoever holds blocks for it frees them.
                await self.bus.publish(
                    self.bus.subjects.aborts, AbortRequest(request_id=rid, reason="gateway gave up")
                )

    async def _submit(self, request: GenerateRequest) -> None:
        """Into the request queue. While JetStream cannot take it (the stream's leader died
        with its NATS server and a new one is being elected) try again, for a while; the
        message id makes a repeat that did land the first time count once."""
        headers = inject({"Nats-Msg-Id": request.request_id})
        deadline = time.monotonic() + _SUBMIT_RETRY_S
        pause = 0.1
        while True:
            try:
                await self.bus.js.publish(
                    self.bus.subjects.requests, request.pack(), headers=headers
                )
                return
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, NoStreamResponseError,
                    ServiceUnavailableError) as exc:  # fmt: skip
                if time.monotonic() + pause > deadline:
                    metrics.error("gateway", "queue_unavailable")
                    raise GenerationError(
                        f"the request queue (NATS JetStream) did not take the request for "
                        f"{_SUBMIT_RETRY_S:.0f}s ({type(exc).__name__}); retry later",
                        503,
                        "queue_unavailable",
                    ) from None
                await asyncio.sleep(pause)
                pause = min(2 * pause, 1.0)

    def _check_gap(self, rid: str, next_index: int, gap_since: float | None) -> None:
        if (
            gap_since is not None
            and time.monotonic() - gap_since > self.settings.token_gap_timeout_s
        ):
            metrics.error("gateway", "token_gap")
            raise _Retry(f"token event {next_index} of {rid} was lost", [])

    def _started_at(self, route: RouteEvent) -> dict[str, float]:
        instances = (route.decode_instance, route.prefill_instance, route.converter_instance)
        found = {i: self.registry.get(i) for i in instances if i}
        return {i: info.started_at for i, info in found.items() if info is not None}

    def _check_alive(
        self, route: RouteEvent | None, routed_to: dict[str, float], decoding: bool
    ) -> None:
        """Retry when an instance on the route stopped heartbeating, or heartbeats again from
        a new process (restarted under the same id within the TTL: the request died with
        the old one)."""
        if route is None:
            return
        watched = [route.decode_instance]
        if not decoding:  # before decode's own tokens, the KV path matters too
            watched += [route.prefill_instance, route.converter_instance or ""]
        dead = []
        for instance in filter(None, watched):
            info = self.registry.get(instance)
            started = routed_to.get(instance)
            if info is None or (started is not None and info.started_at != started):
                dead.append(instance)
        if dead:
            raise _Retry(f"instance {', '.join(dead)} stopped responding", dead)
