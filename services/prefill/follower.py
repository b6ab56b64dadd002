"""A follower rank (1..tp-1) of a tensor-parallel prefill instance.

It runs every step its leader broadcasts on its own shard of the model, and streams its own
shard's KV, layer by layer, from its own NATS connection to where the leader's job says.
"""

from __future__ import annotations

import asyncio
import logging

from proto.messages import KVRoute
from services.common.service import Service
from services.common.settings import WorkerSettings
from services.engine.engine import NativeEngine
from services.engine.factory import build_engine
from services.engine.model import LayerDone
from services.engine.tp_driver import Follower
from services.engine.tp_steps import PrefillStep
from services.prefill.shard_stream import LayerFeed, stream_shard

log = logging.getLogger(__name__)


class PrefillFollower(Service):
    role = "prefill"
    announces = False
    settings: WorkerSettings

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        engine, world = await asyncio.to_thread(build_engine, self.settings)
        self.engine: NativeEngine = engine
        follower = await asyncio.to_thread(Follower, engine, world.control, self._on_prefill)
        self.spawn(self._follow(follower), "tp-follower")

    async def _follow(self, follower: Follower) -> None:
        try:
            await asyncio.to_thread(follower.run)
        finally:  # the leader stopped (or died): this rank has nothing left to do
            self.stopping.set()

    def _on_prefill(self, step: PrefillStep) -> LayerDone:
        """In the follower's thread, before the step runs: start this shard's stream."""
        route = KVRoute.model_validate(step.extra)
        feed = asyncio.run_coroutine_threadsafe(self._new_feed(step), self.loop).result()
        asyncio.run_coroutine_threadsafe(self._stream(step, route, feed), self.loop)
        return feed.on_layer_done

    async def _new_feed(self, step: PrefillStep) -> LayerFeed:
        return LayerFeed(self.engine, step.block_table, len(step.context_ids), self.bus.frame_limit)

    async def _stream(self, step: PrefillStep, route: KVRoute, feed: LayerFeed) -> None:
        async def finish() -> tuple[int | None, dict]:
            return None, {}  # only the leader knows the first token

        try:
            await stream_shard(
                self.bus, self.settings, self.engine.kv, step.request_id, route, feed, finish
            )
        except Exception:
            log.exception(
                "%s rank %d: KV stream of %s failed",
                self.instance_id,
                self.engine.kv.tp_rank,
                step.request_id,
            )
