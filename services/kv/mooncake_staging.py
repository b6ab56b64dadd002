"""A receiver's staging area for the `mooncake` transport: registered memory cut into slots of
one frame each, leased to streams.

At a stream's begin the receiver leases it up to a window of slots and tells the sender
their addresses (in the begin's acknowledgement); the sender writes a data frame's payload
into a free slot, then sends the header naming the slot; the slot is the sender's again when
that frame is acknowledged. The area is bounded: a stream that finds no free slot gets none
and its sender sends its payloads inline over NATS. A lease ends with its stream's end (or a
rejection); slots of a failed stream wait a grace period first, since writes its sender had
under way may still land, and a lease whose stream went quiet for `stale_s` is reclaimed
when another stream needs room.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from proto.frames import FrameError
from services.kv.mooncake_engine import MooncakeEngine, RegisteredMemory

StreamKey = tuple[str, int]  # request id, sender shard


@dataclass
class Lease:
    slots: list[int]
    used_at: float = field(default_factory=time.monotonic)


class StagingArea:
    def __init__(
        self,
        engine: MooncakeEngine,
        total_bytes: int,
        slot_bytes: int,
        stale_s: float = 60.0,
        grace_s: float = 2.0,
    ):
        count = max(1, total_bytes // slot_bytes)
        self.engine = engine
        self.slot_bytes = slot_bytes
        self.stale_s = stale_s
        self.grace_s = grace_s
        self.buffer: RegisteredMemory = engine.register(count * slot_bytes)
        self.base = self.buffer.address
        self._free: list[int] = list(range(count))
        self._cooling: list[tuple[float, list[int]]] = []  # (free again at, slots)
        self.leases: dict[StreamKey, Lease] = {}

    def close(self) -> None:
        """Give the memory back to the engine (a process's area lives as long as it does)."""
        self.engine.unregister(self.buffer)
        self.leases.clear()
        self._free.clear()

    @property
    def num_slots(self) -> int:
        return self.buffer.nbytes // self.slot_bytes

    @property
    def free_slots(self) -> int:
        self._thaw(time.monotonic())
        return len(self._free)

    def lease(self, key: StreamKey, want: int) -> dict:
        """Slots for a new stream, as the sender needs them: {"session", "slots": [[slot,
        address], ...]}; no slots when the area is full."""
        self.release(key)
        now = time.monotonic()
        self._thaw(now)
        if len(self._free) < want:
            for stale in [k for k, v in self.leases.items() if now - v.used_at > self.stale_s]:
                self.release(stale, failed=True)
            self._thaw(now)
        slots = [self._free.pop() for _ in range(min(want, len(self._free)))]
        if slots:
            self.leases[key] = Lease(slots, now)
        return {
            "session": self.engine.session,
            "slots": [[slot, self.base + slot * self.slot_bytes] for slot in slots],
        }

    def view(self, request_id: str, shard: int, slot: int, nbytes: int) -> memoryview:
        """The staged payload of a stream's frame: FrameError unless the slot is its own."""
        lease = self.leases.get((request_id, shard))
        if lease is None or slot not in lease.slots:
            raise FrameError(f"data: staging slot {slot} is not leased to this stream")
        if nbytes > self.slot_bytes:
            raise FrameError(f"data: {nbytes} bytes exceed a staging slot of {self.slot_bytes}")
        lease.used_at = time.monotonic()
        start = slot * self.slot_bytes
        return self.buffer.view[start : start + nbytes]

    def release(self, key: StreamKey, failed: bool = False) -> None:
        lease = self.leases.pop(key, None)
        if lease is None:
            return
        if failed:
            self._cooling.append((time.monotonic() + self.grace_s, lease.slots))
        else:
            self._free.extend(lease.slots)

    def _thaw(self, now: float) -> None:
        ready = [slots for at, slots in self._cooling if at <= now]
        self._cooling = [(at, slots) for at, slots in self._cooling if at > now]
        for slots in ready:
            self._free.extend(slots)
