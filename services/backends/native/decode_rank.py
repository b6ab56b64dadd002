"""A follower rank (1..tp-1) of a native decode instance: its shard of the engine, running
every step the leader broadcasts. Its KV frames arrive in its own process (the decode
service's follower takes them into `cache`, at the blocks the leader shared)."""

from __future__ import annotations

import asyncio

from proto.kv_descriptor import KVDescriptor
from services.backends.native.build import build_engine
from services.common.settings import WorkerSettings
from services.engine.kv_cache import PagedKVCache
from services.engine.tp.follower import Follower
from services.engine.tp.steps import BlockTables


class NativeDecodeRank:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.complete: set[str] = set()  # requests whose KV is whole on this rank

    async def start(self) -> None:
        engine, world = await asyncio.to_thread(build_engine, self.settings)
        self.engine = engine
        self.follower = await asyncio.to_thread(
            Follower, engine, world.control, None, self.complete.__contains__, self._released
        )

    @property
    def kv(self) -> KVDescriptor:
        return self.engine.kv

    @property
    def cache(self) -> PagedKVCache:
        return self.engine.cache

    @property
    def tables(self) -> BlockTables:
        """The leader's block tables, as shared with this rank."""
        return self.follower.tables

    def _released(self, request_ids: list[str]) -> None:
        self.complete.difference_update(request_ids)

    async def run(self) -> None:
        """Until the leader stops (or dies)."""
        await asyncio.to_thread(self.follower.run)
