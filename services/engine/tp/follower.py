"""Ranks 1..tp-1 of an instance: every step the leader broadcasts, run on this rank's shard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from services.engine.engine import NativeEngine
from services.engine.model import LayerDone
from services.engine.tp.handshake import LEADER, GuardedCallback, handshake
from services.engine.tp.steps import (
    BlockTables,
    DecodeStep,
    Message,
    PrefillStep,
    ReadyQuery,
    ShareBlocks,
    Step,
    StopStep,
)

LayerDoneFactory = Callable[[PrefillStep], LayerDone | None]


class Follower:
    """A rank > 0: runs every step the leader broadcasts on its own shard, until StopStep.

    `on_prefill_layer_done_factory(step)` gives the per-layer callback of one prefill step on
    this rank (to export and send this rank's KV frames), or None. `is_ready(request_id)` says
    whether this rank's KV for a request is complete; it is called from the loop's thread.
    `on_released(request_ids)` hears of the requests the leader dropped.
    """

    def __init__(
        self,
        engine: NativeEngine,
        control: dist.ProcessGroup | None,
        on_prefill_layer_done_factory: LayerDoneFactory | None = None,
        is_ready: Callable[[str], bool] | None = None,
        on_released: Callable[[list[str]], None] | None = None,
    ):
        if engine.tp.rank == LEADER:
            raise ValueError("rank 0 leads; followers are ranks 1..tp_size-1")
        self.engine = engine
        self.tables = BlockTables()
        self._control = control
        self._factory = on_prefill_layer_done_factory
        self._is_ready = is_ready
        self._on_released = on_released
        handshake(engine, control)

    def run(self) -> None:
        while True:
            received: list[Any] = [None]
            dist.broadcast_object_list(received, group=self._control, group_src=LEADER)
            message: Message = received[0]
            self.tables.drop(message.released)
            if message.released and self._on_released is not None:
                self._on_released(message.released)
            step = message.step
            if isinstance(step, StopStep):
                return
            self._run(step)

    def _run(self, step: Step) -> None:
        engine = self.engine
        match step:
            case PrefillStep(rows=rows):
                hook = self._factory(step) if self._factory else None
                guard = GuardedCallback(hook, "a prefill step") if hook else None
                engine.forward_prefill([r.input for r in rows], guard, want_logits=False)
            case DecodeStep(rows=rows):
                tables = [self.tables.extend(r.request_id, r.new_blocks) for r in rows]
                engine.forward_decode(
                    [r.last_token for r in rows],
                    [r.num_tokens for r in rows],
                    tables,
                    want_logits=False,
                )
            case ShareBlocks():
                self.tables.set(step.request_id, step.block_table)
            case ReadyQuery(request_ids=ids):
                ready = [rid for rid in ids if self._is_ready is None or self._is_ready(rid)]
                dist.gather_object(ready, None, group=self._control, group_dst=LEADER)
