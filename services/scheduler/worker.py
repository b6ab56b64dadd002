"""Scheduler: takes requests from the JetStream queue and routes each one.

For a request it picks a decode instance that can reserve blocks for it, a prefill
instance, and a route: direct when their KV descriptors are identical, through a converter
otherwise. Decode reserves before prefill starts, so no KV is made that nobody can hold.
"""

from __future__ import annotations

import asyncio
import logging
import time

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from proto.messages import (
    AbortRequest,
    ErrorEvent,
    GenerateRequest,
    InstanceInfo,
    KVRoute,
    MessageError,
    PrefillJob,
    ReserveReply,
    ReserveRequest,
    RouteEvent,
)
from services.common import metrics
from services.common.service import Service
from services.common.settings import SchedulerSettings
from services.common.telemetry import extract, inject, tracer
from services.scheduler.costs import Defaults, PrefixIndex
from services.scheduler.placements import RecentPlacements
from services.scheduler.policy import (
    Busy,
    NoLiveInstance,
    Option,
    RoutingError,
    options,
    unroutable_reason,
)

log = logging.getLogger(__name__)
_tracer = tracer("hetserve.scheduler")


class SchedulerService(Service):
    role = "scheduler"
    settings: SchedulerSettings

    def __init__(self, settings: SchedulerSettings):
        super().__init__(settings)
        self.in_flight = asyncio.Semaphore(settings.max_in_flight)
        self.routed = 0
        self.placing = 0  # requests being routed now (or waiting for free blocks)
        self.prefixes = PrefixIndex()
        self.recent = RecentPlacements()
        self.defaults = Defaults(
            prefill_tokens_per_s=settings.default_prefill_tokens_per_s,
            decode_step_s=settings.default_decode_step_s,
            kv_bytes_per_s=settings.kv_bytes_per_s,
            converter_bytes_per_s=settings.converter_bytes_per_s,
        )

    async def start(self) -> None:
        s = self.bus.subjects
        self.queue = await self.bus.js.pull_subscribe(
            s.requests,
            durable="scheduler",
            stream=s.requests_stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT, ack_wait=self.settings.request_ack_wait_s
            ),
        )
        self.spawn(self._pull_loop(), "scheduler-pull", essential=True)

    async def _pull_loop(self) -> None:
        while True:
            await self.in_flight.acquire()
            try:
                msgs = await self.queue.fetch(1, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                self.in_flight.release()
                metrics.QUEUE_DEPTH.labels("requests").set(0)
                continue
            except nats.errors.Error as exc:
                # The server went away or JetStream is electing a leader (a cluster that lost
                # a node): keep pulling once it is back; giving up would leave a scheduler
                # that heartbeats but never places a request.
                self.in_flight.release()
                log.warning("pulling requests failed (%s); trying again", type(exc).__name__)
                metrics.error("scheduler", "pull_failed")
                await asyncio.sleep(0.5)
                continue
            metrics.QUEUE_DEPTH.labels("requests").set(msgs[0].metadata.num_pending)
            self.spawn(self._handle(msgs[0]), "route")

    async def _handle(self, msg: Msg) -> None:
        self.placing += 1
        alive = asyncio.create_task(self._keep_alive(msg), name="request-keepalive")
        try:
            try:
                request = GenerateRequest.unpack(msg.data)
            except MessageError as exc:
                log.warning("dropping a malformed request: %s", exc)
                metrics.error("scheduler", "malformed_request")
                await msg.term()
                return
            with _tracer.start_as_current_span(
                "scheduler.route", context=extract(msg.headers)
            ) as span:
                span.set_attribute("request.id", request.request_id)
                span.set_attribute("prompt.tokens", len(request.context_token_ids))
                started = time.monotonic()
                try:
                    route = await self._route_when_room(request, msg)
                    span.set_attribute("prefill.instance", route.prefill_instance)
                    span.set_attribute("decode.instance", route.decode_instance)
                    span.set_attribute("converter.instance", route.converter_instance or "")
                    self.routed += 1
                    metrics.routed(time.monotonic() - started, bool(route.converter_instance))
                except RoutingError as exc:
                    span.set_attribute("error", str(exc))
                    metrics.error("scheduler", "unroutable")
                    await self.bus.publish(
                        self.bus.subjects.request_events(request.request_id),
                        ErrorEvent(
                            request_id=request.request_id,
                            message=str(exc),
                            retryable=False,
                            instance_id=self.instance_id,
                        ),
                    )
            await msg.ack()
        finally:
            alive.cancel()
            self.placing -= 1
            self.in_flight.release()

    async def _keep_alive(self, msg: Msg) -> None:
        """Tell JetStream the request is being placed, so its short ack_wait only runs out
        (and the request goes to another scheduler) when this one has died."""
        period = self.settings.request_ack_wait_s / 3
        while True:
            await asyncio.sleep(period)
            try:
                await msg.in_progress()
            except Exception as exc:  # noqa: BLE001 - a lost heartbeat only risks a redelivery
                log.debug("in_progress for a request failed: %s", exc)

    async def _route_when_room(self, request: GenerateRequest, msg: Msg) -> RouteEvent:
        """Route now, or, while every decode instance is only full, wait for blocks to free
        (the request stays queued, its JetStream message kept alive) up to queue_timeout_s.
        With no live instance of a role it needs, wait one registry TTL for one to appear
        (a restart, a NATS server gone and the registry watched anew) before failing."""
        began = time.monotonic()
        deadline = began + self.settings.queue_timeout_s
        pause = 0.02
        while True:
            try:
                return await self._route(request)
            except NoLiveInstance:
                if time.monotonic() + pause > began + self.settings.instance_ttl_s:
                    raise
            except Busy as busy:
                if time.monotonic() + pause > deadline:
                    raise RoutingError(
                        f"every decode instance stayed full for "
                        f"{self.settings.queue_timeout_s:.0f}s: {busy}"
                    ) from None
            await msg.in_progress()
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def _route(self, request: GenerateRequest) -> RouteEvent:
        live = [self.recent.applied(i) for i in self.registry.live()]
        prefills = [i for i in live if i.role == "prefill"]
        decodes = [i for i in live if i.role == "decode"]
        converters = any(
            i.role == "converter" and i.instance_id not in request.excluded_instances for i in live
        )
        self.prefixes.forget({i.instance_id for i in live})
        self.recent.forget({i.instance_id for i in live})
        found = options(
            request, prefills, decodes, converters, self.settings.routing, self.prefixes,
            self.defaults,
        )  # fmt: skip
        if not found:
            raise NoLiveInstance(unroutable_reason(request, prefills, decodes, converters))
        by_decode: dict[str, list[Option]] = {}
        for option in found:  # each decode instance in the order of its best option
            by_decode.setdefault(option.decode.instance_id, []).append(option)
        reasons = []
        full = True  # every refusal so far was for lack of free blocks
        for decode_id, choices in by_decode.items():
            decode, best = choices[0].decode, choices[0]
            align = max(choice.token_align for choice in choices)
            # the reservation waits for the KV at least as long as the estimate says it takes
            expected = best.estimate.ttft_s + best.estimate.transfer_s if best.estimate else 0
            hold = max(self.settings.reserve_hold_s, 4 * expected)
            reply = await self._reserve(decode, request, align, local=best.local, hold_s=hold)
            if not reply.ok:
                reasons.append(f"{decode_id}: {reply.reason}")
                full = full and reply.retry_later
                continue
            local_tokens = _to_prefill(request, best) if best.local else 0
            self.recent.placed(decode, sequences=1, tokens=local_tokens)
            if best.local:  # the decode instance prefills it itself, from now on
                return await self._announce(request, best)
            for choice in choices:
                if choice.local:
                    continue
                route = await self._start_prefill(request, choice, reply.cached_tokens)
                if route is not None:
                    assert choice.prefill is not None
                    self.recent.placed(choice.prefill, tokens=_to_prefill(request, choice))
                    return route
            await self.bus.publish(
                self.bus.subjects.aborts,
                AbortRequest(request_id=request.request_id, reason="no prefill"),
            )
            reasons.append(f"{decode_id}: no prefill instance accepted the job")
        if full and reasons:
            raise Busy("; ".join(reasons))
        raise RoutingError("could not place the request: " + "; ".join(reasons))

    async def _reserve(
        self,
        decode: InstanceInfo,
        request: GenerateRequest,
        align: int,
        local: bool,
        hold_s: float,
    ) -> ReserveReply:
        remaining = request.sampling.max_tokens - len(request.resumed_token_ids)
        ask = ReserveRequest(
            request=request,
            num_tokens=len(request.context_token_ids) + max(remaining, 1),
            hold_seconds=hold_s,
            token_align=align,
            local_prefill=local,
        )
        if local:  # the decode instance's first token goes to the gateway: it must know the route
            await self.bus.publish(
                self.bus.subjects.request_events(request.request_id),
                self._route_event(request, decode.instance_id, decode.instance_id, None),
            )
        try:
            return await self.bus.request(
                self.bus.subjects.reserve(decode.instance_id),
                ask,
                ReserveReply,
                timeout_s=self.settings.reserve_timeout_s,
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, MessageError) as exc:
            return ReserveReply(ok=False, reason=f"no answer ({type(exc).__name__})")

    def _route_event(
        self, request: GenerateRequest, prefill: str, decode: str, converter: str | None
    ) -> RouteEvent:
        return RouteEvent(
            request_id=request.request_id,
            prefill_instance=prefill,
            decode_instance=decode,
            converter_instance=converter,
        )

    async def _announce(self, request: GenerateRequest, option: Option) -> RouteEvent:
        """A local prefill was accepted: its route event went out before the reservation."""
        decode = option.decode.instance_id
        metrics.LOCAL_ROUTES.inc()
        return self._route_event(request, decode, decode, None)

    async def _start_prefill(
        self, request: GenerateRequest, option: Option, cached_tokens: int
    ) -> RouteEvent | None:
        prefill, decode = option.prefill, option.decode
        assert prefill is not None and decode.kv is not None
        converter = None
        if option.via_converter:
            converters = sorted(
                (
                    c
                    for c in self.registry.live("converter")
                    if c.instance_id not in request.excluded_instances
                ),
                key=lambda c: c.running,
            )
            if not converters:
                return None
            converter = converters[0].instance_id
        events = self.bus.subjects.request_events(request.request_id)
        route = self._route_event(request, prefill.instance_id, decode.instance_id, converter)
        # The gateway learns the route first, so it can watch those instances' health.
        await self.bus.publish(events, route)
        job = PrefillJob(
            request=request,
            events_subject=events,
            route=KVRoute(
                send_to=converter or decode.instance_id,
                decode_instance=decode.instance_id,
                decode_kv=decode.kv,
                via_converter=converter is not None,
                token_offset=cached_tokens,
            ),
        )
        try:
            reply = await self.bus.nc.request(
                self.bus.subjects.prefill_jobs(prefill.instance_id),
                job.pack(),
                timeout=self.settings.reserve_timeout_s,
                headers=inject(),
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            log.warning(
                "prefill %s did not take %s: %s",
                prefill.instance_id,
                request.request_id,
                type(exc).__name__,
            )
            return None
        if reply.data != b"ok":
            log.warning(
                "prefill %s refused %s: %s",
                prefill.instance_id,
                request.request_id,
                reply.data[:200],
            )
            return None
        return route

    async def stop(self) -> None:
        # Unsubscribe the pull consumer before the connection drains: draining it with a
        # fetch outstanding waits for the fetch to time out (tens of seconds).
        await self.queue.unsubscribe()

    def status(self):  # noqa: ANN201
        info = super().status()
        info.running = self.placing  # not the semaphore: the idle pull loop holds a permit
        return info


def _to_prefill(request: GenerateRequest, option: Option) -> int:
    cached = option.estimate.cached_prefill if option.estimate else 0
    return len(request.context_token_ids) - cached
