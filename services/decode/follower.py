"""A follower rank (1..tp-1) of a tensor-parallel decode instance.

It takes its own shard's KV frames into the blocks its leader shared, tells the leader when a
request's KV is complete here, and runs every decode step the leader broadcasts.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg

from proto.frames import FrameError, decode_frame
from services.common.kv_stream import acknowledge
from services.common.service import Service
from services.common.settings import WorkerSettings
from services.decode.receiver import Inbound, KVReceiver
from services.engine.factory import build_engine
from services.engine.tp_driver import Follower

log = logging.getLogger(__name__)

_SHARE_WAIT_S = 5.0  # the leader shares blocks before it accepts the request: never long


class DecodeFollower(Service):
    role = "decode"
    announces = False
    settings: WorkerSettings

    def __init__(self, settings: WorkerSettings):
        super().__init__(settings)
        self.inbound: dict[str, Inbound] = {}
        self.complete: set[str] = set()

    async def start(self) -> None:
        engine, world = await asyncio.to_thread(build_engine, self.settings)
        self.receiver = KVReceiver(engine)
        self.follower = await asyncio.to_thread(
            Follower, engine, world.control, None, self.complete.__contains__
        )
        rank = engine.kv.tp_rank
        await self.subscribe(self.bus.subjects.kv_frames(self.instance_id, rank), self._on_frame)
        self.spawn(self._follow(), "tp-follower")

    async def _follow(self) -> None:
        try:
            await asyncio.to_thread(self.follower.run)
        finally:
            self.stopping.set()

    async def _on_frame(self, msg: Msg) -> None:
        try:
            frame = decode_frame(msg.data, self.bus.nc.max_payload)
        except FrameError as exc:
            log.warning(
                "%s rank %d rejected a KV frame: %s",
                self.instance_id,
                self.receiver.engine.kv.tp_rank,
                exc,
            )
            self.inbound.pop(exc.request_id or "", None)
            await acknowledge(msg, False, str(exc))
            return
        rid = frame.request_id
        inbound = self.inbound.get(rid)
        try:
            if inbound is None:
                if frame.kind != "begin":
                    raise FrameError(f"frame for unknown request {rid!r}")
                blocks = await asyncio.to_thread(self.follower.tables.wait, rid, _SHARE_WAIT_S)
                inbound = self.inbound[rid] = Inbound(blocks=blocks, deadline=time.monotonic())
            # The copy into the cache runs off the event loop (frames stay in order: this
            # subscription's handler is awaited frame by frame).
            if await asyncio.to_thread(self.receiver.take, inbound, frame):
                self.complete.add(rid)
            if frame.kind == "end":
                del self.inbound[rid]
        except (FrameError, TimeoutError) as exc:
            log.warning(
                "%s rank %d rejected a KV frame of %s: %s",
                self.instance_id,
                self.receiver.engine.kv.tp_rank,
                rid,
                exc,
            )
            self.inbound.pop(rid, None)
            await acknowledge(msg, False, str(exc))
            return
        # Forget completions the leader has released since.
        self.complete.intersection_update(
            r for r in list(self.complete) if r in self.follower.tables
        )
        await acknowledge(msg)
