"""A follower rank (1..tp-1) of a native prefill instance: it runs every step its leader
broadcasts on its own shard, and streams its own shard's KV, layer by layer, from its own
NATS connection to where each prompt's route says."""

from __future__ import annotations

import asyncio
import logging

from proto.messages import KVRoute
from services.backends.native.build import build_engine
from services.common.bus import Bus
from services.common.settings import WorkerSettings
from services.engine.model import LayerDone
from services.engine.tp.follower import Follower
from services.engine.tp.steps import PrefillRow, PrefillStep
from services.kv.shard_stream import LayerFeed, receiver_rank, stream_shard

log = logging.getLogger(__name__)


class NativePrefillRank:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.feeds: dict[str, LayerFeed] = {}  # prompts whose stream is open, by request

    async def run(self, bus: Bus) -> None:
        """Until the leader stops (or dies)."""
        self.bus = bus
        self.loop = asyncio.get_running_loop()
        engine, world = await asyncio.to_thread(build_engine, self.settings)
        self.engine = engine
        follower = await asyncio.to_thread(
            Follower, engine, world.control, self._on_prefill, on_released=self._released
        )
        await asyncio.to_thread(follower.run)

    def _on_prefill(self, step: PrefillStep) -> LayerDone:
        """In the follower's thread, before the step runs: open the streams of prompts it
        starts; the callback sends every row's new blocks after each layer."""
        rows = [(self._feed(row), row) for row in step.rows]

        def on_layer_done(layer: int) -> None:
            for feed, row in rows:
                feed.on_layer_done(layer, row.input.stop)
                if layer == self.engine.kv.layers[-1] and row.completes_prompt:
                    self.feeds.pop(row.request_id, None)

        return on_layer_done

    def _feed(self, row: PrefillRow) -> LayerFeed:
        feed = self.feeds.get(row.request_id)
        if feed is None:
            kv, route = self.engine.kv, KVRoute.model_validate(row.extra)
            feed = LayerFeed(
                kv, self.engine.cache.export_blocks, row.input.block_table, row.num_tokens,
                self.bus.frame_limit, loop=self.loop, token_offset=route.token_offset,
            )  # fmt: skip
            self.feeds[row.request_id] = feed
            asyncio.run_coroutine_threadsafe(self._stream(row.request_id, route, feed), self.loop)
        return feed

    def _released(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            feed = self.feeds.pop(rid, None)
            if feed is not None:
                feed.fail("the leader dropped the prompt")

    async def _stream(self, request_id: str, route: KVRoute, feed: LayerFeed) -> None:
        async def finish() -> tuple[int | None, dict]:
            return None, {}  # only the leader knows the first token

        kv = self.engine.kv
        try:
            async with self.bus.kv_link(route.send_to, receiver_rank(kv, route)) as link:
                await stream_shard(link, kv, request_id, route, feed, finish)
        except Exception:
            log.exception("rank %d: KV stream of %s failed", kv.tp_rank, request_id)
