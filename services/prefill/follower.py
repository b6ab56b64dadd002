"""A follower rank (1..tp-1) of a tensor-parallel native prefill instance, as its own
process: it runs every step its leader broadcasts and streams its own shard's KV
(services/backends/native/prefill_rank.py)."""

from __future__ import annotations

from services.backends.native.prefill_rank import NativePrefillRank
from services.common.service import Service
from services.common.settings import WorkerSettings


class PrefillFollower(Service):
    role = "prefill"
    moves_kv = True
    announces = False
    settings: WorkerSettings

    async def start(self) -> None:
        self.spawn(self._follow(), "tp-follower", essential=True)

    async def _follow(self) -> None:
        try:
            await NativePrefillRank(self.settings).run(self.bus)
        finally:  # the leader stopped (or died): this rank has nothing left to do
            self.stopping.set()
