"""What a running hetserve is doing, read from its bus: every registry entry (live or gone
stale) and the request queue. `hetserve status` shows it; nothing here writes to the bus."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import nats.js.errors
from nats.js.kv import KeyValue

from proto.messages import InstanceInfo, MessageError
from services.common.bus import Bus

SCHEDULER_CONSUMER = "scheduler"  # the scheduler's durable pull consumer on the request queue


class NoSystem(RuntimeError):
    """Nothing of hetserve under this prefix on this NATS server."""


@dataclass(frozen=True)
class RequestQueue:
    stream: str
    waiting: int  # not yet handed to a scheduler
    placing: int  # handed to a scheduler, not yet routed (it may be waiting for free blocks)


@dataclass
class Snapshot:
    taken_at: float
    ttl_s: float  # an entry older than this is stale: its instance stopped heartbeating
    instances: list[InstanceInfo]
    queue: RequestQueue | None  # None: no scheduler has created its consumer yet
    unreadable: list[str] = field(default_factory=list)  # keys whose entry did not decode

    def age(self, info: InstanceInfo) -> float:
        return max(0.0, self.taken_at - info.heartbeat_at)

    def is_live(self, info: InstanceInfo) -> bool:
        return self.age(info) < self.ttl_s

    def live(self) -> list[InstanceInfo]:
        return [i for i in self.instances if self.is_live(i)]


async def registry_entries(kv: KeyValue) -> tuple[list[InstanceInfo], list[str]]:
    """Every entry of the registry bucket now (the watch's initial values), and the keys
    whose values did not decode."""
    entries: list[InstanceInfo] = []
    unreadable: list[str] = []
    watcher = await kv.watchall(ignore_deletes=True)
    try:
        async for entry in watcher:
            if entry is None:  # end of the initial values
                break
            if not entry.value:
                continue
            try:
                entries.append(InstanceInfo.unpack(entry.value))
            except MessageError:
                unreadable.append(entry.key)
    finally:
        await watcher.stop()
    return entries, unreadable


async def request_queue(bus: Bus) -> RequestQueue | None:
    stream = bus.subjects.requests_stream
    try:
        info = await bus.js.consumer_info(stream, SCHEDULER_CONSUMER)
    except nats.js.errors.NotFoundError:
        return None
    return RequestQueue(stream, info.num_pending or 0, info.num_ack_pending or 0)


async def snapshot(bus: Bus) -> Snapshot:
    """The registry and the request queue now. Raises NoSystem when the prefix has no
    registry bucket on this server (wrong --prefix or --nats-url, or nothing started)."""
    bucket = bus.subjects.registry_bucket
    try:
        kv = await bus.js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        raise NoSystem(
            f"no hetserve registry (bucket {bucket}) at {bus.settings.nats_url_public}: is hetserve "
            "running there, under this prefix?"
        ) from None
    entries, unreadable = await registry_entries(kv)
    entries.sort(key=lambda i: (_ROLE_ORDER.get(i.role, 9), i.instance_id))
    return Snapshot(
        taken_at=time.time(),
        ttl_s=bus.settings.instance_ttl_s,
        instances=entries,
        queue=await request_queue(bus),
        unreadable=unreadable,
    )


_ROLE_ORDER = {"gateway": 0, "scheduler": 1, "prefill": 2, "decode": 3, "converter": 4}
