"""KV frames over core NATS with credit-based flow control: the `nats` transport.

A sender publishes frames in order to the receiver's KV subject with a private reply inbox,
and never has more than `window` frames unacknowledged: a fast prefill cannot outrun a slow
receiver, so the server never has to drop one as a slow consumer. A receiver acknowledges a
frame once it has taken it (stored, or converted and forwarded), or rejects it with the reason
(services/kv/endpoint.py).
"""

from __future__ import annotations

import asyncio

import msgpack
from nats.aio.client import NO_RESPONDERS_STATUS, Client
from nats.aio.msg import Msg

from proto.frames import Frame, encode_frame
from services.kv.hooks import NO_HOOKS, StreamHooks


class StreamFailed(RuntimeError):
    """The receiver rejected a frame, or stopped acknowledging; `receiver` names it, so a
    retry can avoid it."""

    def __init__(self, message: str, receiver: str = ""):
        super().__init__(message)
        self.receiver = receiver


def ack_payload(ok: bool, reason: str = "", extra: dict | None = None) -> bytes:
    return msgpack.packb({"ok": ok, "reason": reason, **(extra or {})})


class NatsLink:
    """One sender's windowed stream of frames to one receiver subject."""

    def __init__(
        self,
        nc: Client,
        subject: str,
        receiver: str,
        window: int,
        ack_timeout_s: float,
        hooks: StreamHooks = NO_HOOKS,
        instance: str = "",
    ):
        self.nc = nc
        self.subject = subject
        self.receiver = receiver  # who it is, in messages ("d-0 rank 1")
        self.instance = instance or receiver  # its instance id, for a retry to avoid
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.hooks = hooks
        self._credits = asyncio.Semaphore(window)
        self._unacked = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._error: str | None = None
        self._sub = None
        self.bytes_sent = 0
        self.frames_sent = 0

    async def __aenter__(self) -> NatsLink:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_ack)

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    async def _on_ack(self, msg: Msg) -> None:
        try:
            reply = msgpack.unpackb(msg.data)
            ok, reason = bool(reply["ok"]), str(reply.get("reason", ""))
        except Exception:  # noqa: BLE001 - a broken ack is a failed stream
            reply, ok, reason = {}, False, "unreadable acknowledgement"
            if msg.headers and msg.headers.get("Status") == NO_RESPONDERS_STATUS:
                reason = f"nothing subscribes to {self.subject} (the receiver stopped)"
        self.acked(msg.subject, reply, ok)
        if not ok and self._error is None:
            self._error = f"{self.receiver} rejected a frame: {reason}"
        self._unacked -= 1
        if self._unacked == 0:
            self._drained.set()
        self._credits.release()

    def acked(self, subject: str, reply: dict, ok: bool) -> None:
        """A transport's own use of an acknowledgement (mooncake: leases, free slots)."""

    def failed(self, reason: str) -> StreamFailed:
        """The stream's failure at this receiver."""
        return StreamFailed(reason, self.instance)

    def _check(self) -> None:
        if self._error is not None:
            raise self.failed(self._error)

    async def send(self, frame: Frame) -> None:
        await self._credit()
        await self._publish(encode_frame(frame), self._inbox, len(frame.payload))

    async def _credit(self) -> None:
        self._check()
        try:
            await asyncio.wait_for(self._credits.acquire(), self.ack_timeout_s)
        except TimeoutError:
            raise self.failed(
                f"{self.receiver} acknowledged nothing for {self.ack_timeout_s:.0f}s"
            ) from None
        self._check()

    async def _publish(self, data: bytes, reply: str, payload_bytes: int) -> None:
        """One frame, its credit taken; `payload_bytes`: what it moves (inline or staged)."""
        self._unacked += 1
        self._drained.clear()
        await self.nc.publish(self.subject, data, reply=reply, headers=self.hooks.headers())
        moved = max(len(data), payload_bytes)
        self.bytes_sent += moved
        self.frames_sent += 1
        self.hooks.frame_sent(moved)

    async def finish(self) -> None:
        """Wait until every frame is acknowledged; raise if any was rejected."""
        try:
            await asyncio.wait_for(self._drained.wait(), self.ack_timeout_s)
        except TimeoutError:
            raise self.failed(
                f"{self.receiver} left {self._unacked} frames unacknowledged"
            ) from None
        self._check()
