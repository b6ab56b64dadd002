"""A follower rank (1..tp-1) of a tensor-parallel native decode instance, as its own process.

It takes its own shard's KV frames into the blocks its leader shared, tells the leader when a
request's KV is complete here, and runs every decode step the leader broadcasts.
"""

from __future__ import annotations

import asyncio

from proto.frames import Frame, FrameError
from services.backends.native.decode_rank import NativeDecodeRank
from services.common.service import Service
from services.common.settings import WorkerSettings
from services.decode.intake import RankIntake
from services.kv.endpoint import Reply

_SHARE_WAIT_S = 5.0  # the leader shares blocks before it accepts the request: never long


class DecodeFollower(Service):
    role = "decode"
    announces = False
    moves_kv = True
    settings: WorkerSettings

    def __init__(self, settings: WorkerSettings):
        super().__init__(settings)
        self.rank = NativeDecodeRank(settings)
        self.blocks: dict[str, list[int]] = {}  # requests whose frames are arriving here

    async def start(self) -> None:
        await self.rank.start()
        self.intake = RankIntake(self.rank.kv, self.rank.cache)
        rank = self.rank.kv.tp_rank
        endpoint = self.bus.kv_endpoint(
            f"{self.instance_id} rank {rank}", self._on_frame, self._on_rejected
        )
        await self.subscribe(self.bus.subjects.kv_frames(self.instance_id, rank), endpoint)
        self.spawn(self._follow(), "tp-follower", essential=True)

    async def _follow(self) -> None:
        try:
            await self.rank.run()
        finally:  # the leader stopped (or died): this rank has nothing left to do
            self.stopping.set()

    async def _on_frame(self, frame: Frame, reply: Reply) -> None:
        rid = frame.request_id
        if frame.kind == "begin" and rid not in self.blocks:
            try:
                self.blocks[rid] = await asyncio.to_thread(
                    self.rank.tables.wait, rid, _SHARE_WAIT_S
                )
            except TimeoutError as exc:
                raise FrameError(str(exc)) from None
            self.intake.open(rid, None, None)  # the leader checked the offset
        blocks = self.blocks.get(rid)
        if blocks is None:
            raise FrameError(f"frame for unknown request {rid!r}")
        reader = await self.intake.take(frame, blocks)
        if frame.kind == "end":
            self._forget(rid)
            if reader.complete:
                self.rank.complete.add(rid)

    async def _on_rejected(self, request_id: str | None, reason: str) -> None:
        if request_id is not None:
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self.blocks.pop(request_id, None)
        self.intake.close(request_id)
