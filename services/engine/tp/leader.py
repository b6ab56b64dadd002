"""Rank 0 of an instance: each step broadcast to the followers, then run on its own shard
(see the package docstring for the rules)."""

from __future__ import annotations

import threading
from typing import Any

import torch.distributed as dist

from services.engine.engine import NativeEngine, prefill_input
from services.engine.model import LayerDone
from services.engine.scheduler import PrefillChunk
from services.engine.sequence import Sequence
from services.engine.tp.handshake import LEADER, GuardedCallback, handshake
from services.engine.tp.steps import (
    DecodeRow,
    DecodeStep,
    Message,
    PrefillRow,
    PrefillStep,
    ReadyQuery,
    ShareBlocks,
    Step,
    StopStep,
)


class LeaderEngine:
    """Rank 0's engine: NativeEngine's step methods, each broadcast to the followers first.

    `engine` is the wrapped NativeEngine: read its kv, cfg, cache and blocks there, but run
    steps only here. Built at the same time as every follower's `Follower` (they check each
    other's engines). With tp_size 1 it adds nothing and calls no torch.distributed function.
    """

    def __init__(self, engine: NativeEngine, control: dist.ProcessGroup | None):
        if engine.tp.rank != LEADER:
            raise ValueError(f"the leader is rank {LEADER}, this engine is rank {engine.tp.rank}")
        self.engine = engine
        self._control = control
        self._lock = threading.Lock()
        self._known: dict[str, int] = {}  # request -> length of the table the followers hold
        self._released: list[str] = []
        self._stopped = False
        if engine.tp.size > 1:
            handshake(engine, control)

    @property
    def tp_size(self) -> int:
        return self.engine.tp.size

    def __enter__(self) -> LeaderEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _broadcast(self, step: Step) -> None:
        if self._stopped:
            raise RuntimeError("the followers were stopped")
        message = Message(step, self._released)
        self._released = []
        if self.engine.tp.size > 1:
            dist.broadcast_object_list([message], group=self._control, group_src=LEADER)

    def prefill_step(
        self,
        chunks: list[PrefillChunk],
        on_layer_done: LayerDone | None = None,
        extras: list[Any] | None = None,
    ) -> list[int | None]:
        """NativeEngine.prefill_step on every rank; `extras[i]` (picklable) reaches the
        followers' callback factory with row i, e.g. where to send their frames. An error of
        `on_layer_done` is raised after the step: every rank finishes the step first."""
        with self._lock:
            extras = extras or [None] * len(chunks)
            rows = [
                PrefillRow(c.seq.request_id, prefill_input(c), len(c.seq.context_ids), extra)
                for c, extra in zip(chunks, extras, strict=True)
            ]
            for row in rows:
                self.engine.check_blocks(row.input.block_table, row.input.stop)
            self._broadcast(PrefillStep(rows))
            guard = GuardedCallback(on_layer_done, "a prefill step") if on_layer_done else None
            tokens = self.engine.prefill_step(chunks, guard)
            if guard is not None and guard.error is not None:
                raise guard.error
            return tokens

    def prefill(
        self, seq: Sequence, on_layer_done: LayerDone | None = None, extra: Any = None
    ) -> int:
        """The rest of one sequence's context in one step, on every rank."""
        chunk = PrefillChunk(seq, seq.num_computed, len(seq.context_ids))
        [token] = self.prefill_step([chunk], on_layer_done, [extra])
        assert token is not None
        return token

    def decode(self, seqs: list[Sequence]) -> list[int]:
        """NativeEngine.decode on every rank; only the leader samples. A sequence's block
        table may only grow while it is decoded; to replace it, `release` it first."""
        with self._lock:
            for seq in seqs:
                self.engine.check_blocks(seq.block_table, seq.num_tokens)
                if len(seq.block_table) < self._known.get(seq.request_id, 0):
                    raise ValueError(f"block table of {seq.request_id} shrank; release it first")
            rows = []
            for seq in seqs:
                known = self._known.get(seq.request_id, 0)
                self._known[seq.request_id] = len(seq.block_table)
                rows.append(
                    DecodeRow(
                        seq.request_id, seq.last_token, seq.num_tokens, seq.block_table[known:]
                    )
                )
            self._broadcast(DecodeStep(rows))
            tokens = self.engine.decode(seqs)
            self._release([seq.request_id for seq in seqs if seq.finished])
            return tokens

    def share_blocks(self, request_id: str, block_table: list[int]) -> None:
        """Give the followers a request's blocks before its KV frames reach them."""
        with self._lock:
            self._known[request_id] = len(block_table)
            self._broadcast(ShareBlocks(request_id, list(block_table)))

    def release(self, request_ids: list[str]) -> None:
        """Followers forget these requests (tables, prefill streams) with the next message (no
        message now). Call it whenever a shared, prefilled or decoded request is dropped."""
        with self._lock:
            self._release(request_ids)

    def _release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._known.pop(request_id, None)
            self._released.append(request_id)

    def ready_everywhere(self, request_ids: list[str]) -> list[str]:
        """Those of `request_ids` (ready on the leader, the caller's business) whose KV every
        follower reports complete. One broadcast and one gather."""
        with self._lock:
            if self.engine.tp.size == 1:
                return list(request_ids)
            self._broadcast(ReadyQuery(list(request_ids)))
            answers: list[Any] = [None] * self.engine.tp.size
            dist.gather_object(list(request_ids), answers, group=self._control, group_dst=LEADER)
            ready = set(request_ids).intersection(*answers)
            return [request_id for request_id in request_ids if request_id in ready]

    def stop(self) -> None:
        """End the followers' loops (idempotent)."""
        with self._lock:
            if not self._stopped:
                self._broadcast(StopStep())
                self._stopped = True
