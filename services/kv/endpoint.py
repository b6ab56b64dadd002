"""The receiving end of a KV subject: decode each frame, hand it on, acknowledge it.

One path for every receiver (decode ranks, vLLM staging shards, the converter): a frame that
does not decode, or that its handler refuses (FrameError, ValueError), is logged with the
reason and answered with a negative acknowledgement, which fails the sender's stream, and the
receiver is told (`on_rejected`) so it can let go of the request. Anything else is
acknowledged when the handler returns, unless the handler keeps the reply to answer later
(the converter acknowledges a layer's last frame once that layer went out).

With a staging area (the `mooncake` transport) a begin's acknowledgement leases the stream
slots to write payloads into, a data frame's payload is read from its slot (the same checks),
and the lease ends with the stream's end or a rejection: the handler sees the same frames.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from proto.frames import Frame, FrameError, decode_frame
from services.kv.hooks import NO_HOOKS, StreamHooks
from services.kv.nats_link import ack_payload

if TYPE_CHECKING:
    from services.kv.mooncake_staging import StagingArea

log = logging.getLogger(__name__)


class Reply:
    """The acknowledgement one frame is owed: given exactly once."""

    def __init__(self, msg: Msg, hooks: StreamHooks):
        self._msg = msg
        self._hooks = hooks
        self.headers = msg.headers  # e.g. the sender's trace context
        self.kept = False  # the handler answers later
        self.given = False
        self.extra: dict[str, Any] = {}  # what an acceptance tells the sender besides
        self.on_given: Callable[[bool], None] | None = None

    def keep(self) -> Reply:
        self.kept = True
        return self

    async def accept(self) -> None:
        await self._give(True, "")

    async def reject(self, reason: str) -> None:
        await self._give(False, reason)

    async def _give(self, ok: bool, reason: str) -> None:
        if self.given:
            return
        self.given = True
        self._hooks.frame_received(len(self._msg.data), ok)
        if self.on_given is not None:
            self.on_given(ok)
        if self._msg.reply:
            await self._msg.respond(ack_payload(ok, reason, self.extra if ok else None))


FrameHandler = Callable[[Frame, Reply], Awaitable[None]]
RejectHandler = Callable[[str | None, str], Awaitable[None]]  # request id (if known), reason


class FrameEndpoint:
    def __init__(
        self,
        who: str,
        max_bytes: Callable[[], int],
        handle: FrameHandler,
        on_rejected: RejectHandler,
        hooks: StreamHooks = NO_HOOKS,
        staging: StagingArea | None = None,
        window: int = 4,
    ):
        """`staging`: where mooncake senders write payloads (None: inline payloads only);
        `window`: the slots a stream is leased."""
        self.who = who
        self.max_bytes = max_bytes
        self.handle = handle
        self.on_rejected = on_rejected
        self.hooks = hooks
        self.staging = staging
        self.window = window

    async def __call__(self, msg: Msg) -> None:
        reply = Reply(msg, self.hooks)
        staged = self.staging.view if self.staging is not None else None
        try:
            frame = decode_frame(msg.data, self.max_bytes(), staged)
        except FrameError as exc:
            await self._reject(reply, exc.request_id, str(exc))
            return
        if self.staging is not None:
            self._stage(frame, reply, self.staging)
        try:
            await self.handle(frame, reply)
        except (FrameError, ValueError) as exc:
            await self._reject(reply, frame.request_id, str(exc))
            return
        if not reply.kept:
            await reply.accept()

    def _stage(self, frame: Frame, reply: Reply, staging: StagingArea) -> None:
        """Lease slots at a begin; give them back at the end, or at once on a rejection."""
        key = (frame.request_id, frame.shard)
        if frame.kind == "begin":
            reply.extra = {"mooncake": staging.lease(key, self.window)}
        failed_end = frame.kind == "end" and "error" in frame.extra

        def given(ok: bool) -> None:
            if not ok or frame.kind == "end":
                staging.release(key, failed=not ok or failed_end)

        reply.on_given = given

    async def _reject(self, reply: Reply, request_id: str | None, reason: str) -> None:
        log.warning(
            "%s rejected a KV frame of %s: %s", self.who, request_id or "an unknown request", reason
        )
        await reply.reject(reason)
        await self.on_rejected(request_id, reason)
