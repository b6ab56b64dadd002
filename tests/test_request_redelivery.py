"""A request taken by a scheduler that then died goes to another one in seconds: the
scheduler's JetStream consumer has a short ack_wait (live schedulers send in_progress while
they place a request), not the 30 s it had. Real nats-server; the dead scheduler is a
connection that pulled the message and closed without acknowledging it."""

from __future__ import annotations

import time
import uuid

import nats

from services.common.bus import Bus
from services.common.nats_server import NatsServer
from services.common.settings import SchedulerSettings
from services.scheduler.worker import SchedulerService


async def test_an_unacked_request_is_redelivered_within_ack_wait(
    nats_server: NatsServer,
) -> None:
    settings = SchedulerSettings(
        nats_url=nats_server.url, prefix=f"redeliver{uuid.uuid4().hex[:8]}"
    )
    bus = await Bus.connect(settings, "test-scheduler")
    await bus.ensure_streams()
    scheduler = SchedulerService(settings)
    scheduler.bus = bus
    await scheduler.start()  # creates the durable consumer, as a running scheduler does
    await scheduler.stop()
    for task in list(scheduler._tasks):
        task.cancel()
    s = bus.subjects
    info = await bus.js.consumer_info(s.requests_stream, "scheduler")
    assert info.config.ack_wait == settings.request_ack_wait_s

    dead = await nats.connect(nats_server.url)
    sub = await dead.jetstream().pull_subscribe(s.requests, durable="scheduler")
    await bus.js.publish(s.requests, b"a request")
    (taken,) = await sub.fetch(1, timeout=5)
    taken_at = time.monotonic()
    await dead.close()  # killed: never acks

    other = await bus.js.pull_subscribe(s.requests, durable="scheduler")
    (again,) = await other.fetch(1, timeout=settings.request_ack_wait_s + 5)
    waited = time.monotonic() - taken_at
    assert again.data == taken.data == b"a request"
    assert again.metadata.num_delivered == 2
    assert waited < settings.request_ack_wait_s + 2
    await again.ack()
    await bus.close()
