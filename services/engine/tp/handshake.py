"""The ranks of an instance check, once, that they run the same engine."""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist

from services.engine.engine import NativeEngine

LEADER = 0
log = logging.getLogger(__name__)


def _signature(engine: NativeEngine) -> dict[str, Any]:
    """What must be equal on every rank for the leader's block ids and steps to mean the same."""
    kv = engine.kv.model_dump(exclude={"tp_rank"})
    return {"model": engine.cfg, "kv": kv, "num_blocks": engine.cache.num_blocks}


def handshake(engine: NativeEngine, control: dist.ProcessGroup | None) -> None:
    """Every rank, once, as its LeaderEngine / Follower is built: the leader compares the
    followers' engines with its own and every rank raises the same error on a mismatch."""
    mine = _signature(engine)
    leader = engine.tp.rank == LEADER
    theirs: list[Any] | None = [None] * engine.tp.size if leader else None
    dist.gather_object(mine, theirs, group=control, group_dst=LEADER)
    verdict: list[Any] = [None]
    if leader and theirs is not None:
        wrong = {
            rank: [key for key in mine if other[key] != mine[key]]
            for rank, other in enumerate(theirs)
            if other != mine
        }
        if wrong:
            verdict[0] = f"engines differ from rank 0's (rank: what differs): {wrong}"
    dist.broadcast_object_list(verdict, group=control, group_src=LEADER)
    if verdict[0]:
        raise ValueError(verdict[0])


class GuardedCallback:
    """A layer-done callback whose failure cannot stop this rank's compute: the other ranks
    wait in the same step's all-reduces. The first error is kept and the callback skipped
    from then on; the leader raises it once the step is over, a follower logs it."""

    def __init__(self, callback: Any, what: str):
        self.callback = callback
        self.what = what
        self.error: Exception | None = None

    def __call__(self, layer: int) -> None:
        if self.error is not None:
            return
        try:
            self.callback(layer)
        except Exception as exc:
            self.error = exc
            log.exception("layer-done callback of %s failed at layer %d", self.what, layer)
