"""A peer that died is named, and retried around, at once (found by scripts/chaos.py):
- frames to a receiver whose process is gone get NATS's no-responders status; the stream fails
  saying so, and the prefill blames that receiver, not itself;
- an instance on a request's route restarted under the same id within the registry's TTL (the
  request died with the old process) is dead to the gateway: it retries.
Real nats-server, the gateway's own dispatch, the prefill's own blame rule."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import pytest

from proto.frames import Frame
from proto.messages import (
    GenerateRequest,
    InstanceInfo,
    RouteEvent,
    SamplingParams,
    TokenEvent,
)
from services.common.bus import Bus
from services.common.nats_server import NatsServer
from services.common.registry import Registry
from services.common.service import Service
from services.common.settings import CommonSettings, GatewaySettings
from services.gateway.dispatch import NatsBackend
from services.kv.nats_link import StreamFailed
from services.prefill.worker import culprit


def _prefix() -> str:
    return f"dead{uuid.uuid4().hex[:8]}"


async def test_frames_to_a_gone_receiver_fail_naming_it(nats_server: NatsServer) -> None:
    bus = await Bus.connect(CommonSettings(nats_url=nats_server.url, prefix=_prefix()), "t")
    frame = Frame(kind="end", request_id="r-1", seq=0, shard=0, layout_id="x", first_token=5)
    with pytest.raises(StreamFailed) as failed:
        async with bus.kv_link("converter-7", rank=1) as link:
            await link.send(frame)
            await link.finish()
    assert "nothing subscribes to" in str(failed.value), failed.value
    assert failed.value.receiver == "converter-7"
    try:
        raise RuntimeError("prefill step failed") from failed.value
    except RuntimeError as wrapped:
        assert culprit(wrapped, "p-0") == "converter-7"
    assert culprit(ValueError("the prefill's own fault"), "p-0") == "p-0"
    await bus.close()


async def test_a_route_instance_restarted_within_the_ttl_is_retried(
    nats_server: NatsServer,
) -> None:
    settings = GatewaySettings(nats_url=nats_server.url, prefix=_prefix())
    bus = await Bus.connect(settings, "test-gateway")
    await bus.ensure_streams()
    s = bus.subjects
    queue = await bus.js.pull_subscribe(s.requests, durable="scheduler")
    registry = Registry(bus, ttl_s=30.0)  # far longer than the test: only a restart shows
    await registry.start()
    decode = InstanceInfo(instance_id="d-0", role="decode", started_at=100.0, pid=1)
    prefill = InstanceInfo(instance_id="p-0", role="prefill", started_at=100.0, pid=2)

    async def heartbeat() -> None:
        while True:
            for info in (decode, prefill):
                await registry.announce(info)
            await asyncio.sleep(0.2)

    beating = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.5)
    backend = NatsBackend(bus, registry, settings, "m", 128)
    request = GenerateRequest(
        request_id="re-1", prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=4)
    )

    async def collect() -> list[int]:
        return [t async for event in backend.generate(request) for t in event.token_ids]

    tokens = asyncio.create_task(collect())
    (first,) = await queue.fetch(1, timeout=5)
    await first.ack()
    events = s.request_events("re-1")
    route = RouteEvent(request_id="re-1", prefill_instance="p-0", decode_instance="d-0")
    await bus.publish(events, route)
    await bus.publish(events, TokenEvent(request_id="re-1", index=0, token_ids=[10]))
    await bus.publish(events, TokenEvent(request_id="re-1", index=1, token_ids=[11]))
    await asyncio.sleep(1.0)  # the gateway checks liveness while it waits: all is well
    assert not tokens.done()
    decode.started_at, decode.pid = 200.0, 3  # d-0 restarted: its sequences are gone
    restarted = time.monotonic()

    (retry,) = await queue.fetch(1, timeout=10)
    await retry.ack()
    again = GenerateRequest.unpack(retry.data)
    assert again.request_id == "re-1-r1"
    assert again.resumed_token_ids == [10, 11]
    assert again.excluded_instances == ["d-0"]
    assert time.monotonic() - restarted < 3
    await bus.publish(
        s.request_events(again.request_id),
        TokenEvent(
            request_id=again.request_id, index=2, token_ids=[12, 13], finish_reason="length"
        ),
    )
    assert await asyncio.wait_for(tokens, 10) == [10, 11, 12, 13]
    beating.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await beating
    await registry.stop()
    await bus.close()


class _FailingLoop(Service):
    role = "converter"

    async def start(self) -> None:
        self.spawn(self._fail_after(0.1), "per-request work")
        self.spawn(self._fail_after(0.6), "step loop", essential=True)

    async def _fail_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        raise RuntimeError("engine step failed")


async def test_a_failed_essential_loop_stops_the_service(nats_server: NatsServer) -> None:
    """Else the instance would heartbeat for ever and serve nothing: it exits 1 instead, for
    `hetserve up` (or Kubernetes) to restart it. Other failed work only gets logged."""
    settings = CommonSettings(nats_url=nats_server.url, prefix=_prefix(), instance_id="loop-0")
    service = _FailingLoop(settings)
    began = time.monotonic()
    await asyncio.wait_for(service.run(), 30)
    assert service.exit_code == 1
    assert time.monotonic() - began >= 0.6  # the per-request failure did not stop it
