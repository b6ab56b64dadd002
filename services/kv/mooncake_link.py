"""KV frames whose payloads the Mooncake Transfer Engine writes: the `mooncake` transport.

The control plane stays the `nats` transport's (services/kv/nats_link.py): every frame's
header goes to the receiver's KV subject, in order, windowed, each acknowledged. What
differs is where a data frame's bytes go. The begin's acknowledgement leases the stream
slots of the receiver's registered staging memory (services/kv/mooncake_staging.py), with
their addresses and the receiver's engine session; for each data frame the sender takes a
free slot, has the engine write the payload there, and only then publishes the header (with
the payload's length and checksum) naming the slot. A slot is free again when its frame is
acknowledged (each slot acknowledges to its own reply subject). A receiver that leased no
slots (full, or on the `nats` transport) gets the payloads inline. The first data frame, not
the begin, waits for the lease, so a prefill computes its first layer meanwhile. A failed
write fails the stream with the reason, within `ack_timeout_s`.
"""

from __future__ import annotations

import asyncio

from nats.aio.client import Client

from proto.frames import Frame, encode_frame
from services.kv.hooks import NO_HOOKS, StreamHooks
from services.kv.mooncake_engine import MooncakeEngine
from services.kv.nats_link import NatsLink


class MooncakeLink(NatsLink):
    def __init__(
        self,
        nc: Client,
        subject: str,
        receiver: str,
        window: int,
        ack_timeout_s: float,
        engine: MooncakeEngine,
        hooks: StreamHooks = NO_HOOKS,
        fail_write_after: int = -1,
        instance: str = "",
    ):
        """`fail_write_after`: fault injection for tests: after this many payloads written,
        write outside the receiver's memory, which the engine refuses (-1: never)."""
        super().__init__(nc, subject, receiver, window, ack_timeout_s, hooks, instance)
        self.engine = engine
        self.fail_write_after = fail_write_after
        self.session = ""
        self.slots: dict[int, int] = {}  # slot -> address in the receiver
        self._begun = False
        self._leased = asyncio.Event()
        self._free: asyncio.Queue[int] = asyncio.Queue()
        self.bytes_staged = 0

    async def open(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)

    def acked(self, subject: str, reply: dict, ok: bool) -> None:
        tag = subject.rsplit(".", 1)[-1]
        if tag == "begin":
            lease = reply.get("mooncake") if ok else None
            if isinstance(lease, dict):
                self.session = str(lease.get("session", ""))
                self.slots = {int(s): int(a) for s, a in lease.get("slots", [])}
                for slot in self.slots:
                    self._free.put_nowait(slot)
            self._leased.set()
        elif tag.isdigit() and int(tag) in self.slots:
            self._free.put_nowait(int(tag))

    async def send(self, frame: Frame) -> None:
        if frame.kind == "begin":
            self._begun = True
            await self._credit()
            await self._publish(encode_frame(frame), f"{self._inbox}.begin", 0)
            return  # the lease is awaited by the first data frame: a prefill computes meanwhile
        if frame.kind == "data" and self._begun:
            await self._await_lease()
        if frame.kind == "data" and self.slots:
            await self._send_staged(frame)
        else:
            await self._credit()
            await self._publish(encode_frame(frame), f"{self._inbox}.inline", len(frame.payload))

    async def _await_lease(self) -> None:
        if self._leased.is_set():
            return
        try:
            await asyncio.wait_for(self._leased.wait(), self.ack_timeout_s)
        except TimeoutError:
            raise self.failed(
                f"{self.receiver} did not answer the begin in {self.ack_timeout_s:.0f}s"
            ) from None
        self._check()

    async def _send_staged(self, frame: Frame) -> None:
        await self._credit()
        try:
            slot = await asyncio.wait_for(self._free.get(), self.ack_timeout_s)
        except TimeoutError:
            raise self.failed(f"{self.receiver} freed no staging slot in time") from None
        self._check()
        address = self.slots[slot]
        if self.fail_write_after == 0:
            address += 1 << 40  # nowhere the receiver registered
        self.fail_write_after -= 1
        try:
            rc = await asyncio.wait_for(
                asyncio.to_thread(self.engine.write, self.session, frame.payload, address),
                self.ack_timeout_s,
            )
        except TimeoutError:
            rc = "timed out"
        if rc != 0:
            reason = (
                f"transfer-engine write of {len(frame.payload)} bytes to {self.receiver} "
                f"({self.session}) failed: {rc}"
            )
            self._credits.release()  # the end frame telling the receiver needs one
            raise self.failed(reason)
        self.bytes_staged += len(frame.payload)
        await self._publish(
            encode_frame(frame, at=slot), f"{self._inbox}.{slot}", len(frame.payload)
        )
