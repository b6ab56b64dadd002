"""A token event lost on core NATS (a later one came, the one before it never will) is a
gap: the gateway retries, resuming after the tokens it delivered, within
token_gap_timeout_s instead of waiting token_timeout_s (60 s) for it. Real nats-server and
the gateway's own dispatch; the test plays the scheduler and decode's side of the bus (it
takes the queued request and publishes its events, leaving one out)."""

from __future__ import annotations

import asyncio
import time
import uuid

from proto.messages import GenerateRequest, SamplingParams, TokenEvent
from services.common.bus import Bus
from services.common.nats_server import NatsServer
from services.common.registry import Registry
from services.common.settings import GatewaySettings
from services.gateway.dispatch import NatsBackend


async def test_a_lost_token_event_is_retried_not_waited_out(nats_server: NatsServer) -> None:
    settings = GatewaySettings(
        nats_url=nats_server.url, prefix=f"gap{uuid.uuid4().hex[:8]}", token_gap_timeout_s=1.0
    )
    bus = await Bus.connect(settings, "test-gateway")
    await bus.ensure_streams()
    s = bus.subjects
    queue = await bus.js.pull_subscribe(s.requests, durable="scheduler")
    backend = NatsBackend(bus, Registry(bus, ttl_s=5.0), settings, "m", 128)
    request = GenerateRequest(
        request_id="gap-1", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=4)
    )

    async def collect() -> list[int]:
        return [t async for event in backend.generate(request) for t in event.token_ids]

    tokens = asyncio.create_task(collect())
    (first,) = await queue.fetch(1, timeout=5)
    await first.ack()
    events = s.request_events("gap-1")
    await bus.publish(events, TokenEvent(request_id="gap-1", index=0, token_ids=[10]))
    await bus.publish(events, TokenEvent(request_id="gap-1", index=2, token_ids=[12]))  # 1 lost
    sent = time.monotonic()

    (retry,) = await queue.fetch(1, timeout=settings.token_gap_timeout_s + 5)
    waited = time.monotonic() - sent
    await retry.ack()
    again = GenerateRequest.unpack(retry.data)
    assert again.request_id == "gap-1-r1"
    assert again.resumed_token_ids == [10]
    assert waited < settings.token_gap_timeout_s + 2
    await bus.publish(
        s.request_events(again.request_id),
        TokenEvent(
            request_id=again.request_id, index=1, token_ids=[11, 12, 13], finish_reason="length"
        ),
    )
    assert await asyncio.wait_for(tokens, 10) == [10, 11, 12, 13]
    await bus.close()
