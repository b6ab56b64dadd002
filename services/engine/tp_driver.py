"""Run the ranks of one tensor-parallel instance in lockstep.

Every rank is an OS process with its own NativeEngine holding its shard. Rank 0, the leader,
decides each step: `LeaderEngine` broadcasts a small description of it (tp_steps.py) over a
gloo group, CPU objects even when tensors go over NCCL, then runs it on its own shard.
`Follower.run`, on every other rank, receives each step and runs the same engine call on its
shard. The model's all-reduces tie the ranks together, so a step the leader runs without
broadcasting it first would hang the instance: run steps only through LeaderEngine.

Block ids: the leader's allocator decides them and followers use the same ids; a follower's
own allocator is never touched. Prefill steps carry their whole table; decode steps carry only
blocks a request gained since the follower last saw it (`Follower.tables`). The leader tells
followers to forget a request with the next message after `release` or after the request
finishes in a decode step.

Threading rules, per process:
- leader: any thread may call LeaderEngine's methods; a lock runs one step at a time.
- follower: `Follower.run` owns one thread and spends its idle time in a gloo receive that
  releases the GIL. Other threads may call `engine.cache.import_blocks` meanwhile, for blocks
  no running step touches: those of a request the leader has shared (`share_blocks`) but not
  yet put into a decode step. On CUDA, import on the default stream (import_blocks does), so
  the next step is queued after the copy.
- a request whose KV is imported on every rank may join decode only after the leader has
  seen it ready everywhere (`ready_everywhere`, answered by each follower's `is_ready`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from services.engine.engine import NativeEngine
from services.engine.model import LayerDone
from services.engine.sequence import Sequence
from services.engine.tp_steps import (
    BlockTables,
    DecodeRow,
    DecodeStep,
    Message,
    PrefillStep,
    ReadyQuery,
    ShareBlocks,
    Step,
    StopStep,
)

log = logging.getLogger(__name__)

LayerDoneFactory = Callable[[PrefillStep], LayerDone | None]
LEADER = 0


@dataclass(frozen=True)
class TPWorld:
    """This process's rank in a tensor-parallel instance and the groups it talks over."""

    rank: int
    size: int
    group: dist.ProcessGroup | None  # tensors (nccl or gloo); None for size 1
    control: dist.ProcessGroup | None  # step messages (gloo); None for size 1
    device: torch.device

    def engine_kwargs(self) -> dict[str, Any]:
        """NativeEngine's arguments for this rank."""
        return {
            "tp_rank": self.rank,
            "tp_size": self.size,
            "tp_group": self.group,
            "device": self.device,
        }

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_tp(
    rank: int,
    size: int,
    master_addr: str,
    master_port: int,
    backend: str = "gloo",
    *,
    device: torch.device | str | None = None,
    timeout: timedelta = timedelta(minutes=10),
    control_timeout: timedelta = timedelta(days=30),
) -> TPWorld:
    """Join the instance's process group (every rank calls this, with the same master).

    `control_timeout` bounds how long a follower waits for the leader's next step, i.e. how
    long the instance may stay idle; a leader that dies is noticed at once (the connection
    closes). `device` defaults to cuda:(rank % GPUs) for nccl and cpu for gloo.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be gloo or nccl, not {backend!r}")
    if device is None:
        device = f"cuda:{rank % torch.cuda.device_count()}" if backend == "nccl" else "cpu"
    device = torch.device(device)
    if size == 1:
        return TPWorld(0, 1, None, None, device)
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=size,
        timeout=timeout,
    )
    control = dist.new_group(backend="gloo", timeout=control_timeout)
    return TPWorld(rank, size, dist.group.WORLD, control, device)


def _signature(engine: NativeEngine) -> dict[str, Any]:
    """What must be equal on every rank for the leader's block ids and steps to mean the same."""
    kv = engine.kv.model_dump(exclude={"tp_rank"})
    return {"model": engine.cfg, "kv": kv, "num_blocks": engine.cache.num_blocks}


def _handshake(engine: NativeEngine, control: dist.ProcessGroup | None) -> None:
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


class LeaderEngine:
    """Rank 0's engine: NativeEngine's step methods, each broadcast to the followers first.

    Other attributes (kv, cfg, cache, allocator, new_sequence, ...) are the wrapped engine's.
    Built at the same time as every follower's `Follower` (they check each other's engines).
    With tp_size 1 it adds nothing and calls no torch.distributed function.
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
            _handshake(engine, control)

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet: never recurse
            raise AttributeError(name)
        return getattr(self.engine, name)

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

    def prefill(
        self, seq: Sequence, on_layer_done: LayerDone | None = None, *, extra: Any = None
    ) -> int:
        """NativeEngine.prefill on every rank; `extra` (picklable) reaches the followers'
        callback factory in the PrefillStep, e.g. where to send their frames. An error of
        `on_layer_done` is raised after the step: every rank finishes the step first."""
        with self._lock:
            self.engine.check_blocks(seq.block_table, len(seq.context_ids))
            step = PrefillStep(seq.request_id, list(seq.context_ids), list(seq.block_table), extra)
            self._broadcast(step)
            guard = _GuardedCallback(on_layer_done, seq.request_id) if on_layer_done else None
            token = self.engine.prefill(seq, guard)
            if guard is not None and guard.error is not None:
                raise guard.error
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
                        seq.request_id, seq.all_ids[-1], seq.num_tokens, seq.block_table[known:]
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
        """Followers forget these requests' tables with the next message (no message now).
        Call it whenever a shared or decoded request is dropped; unknown ids are ignored."""
        with self._lock:
            self._release(request_ids)

    def _release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if self._known.pop(request_id, None) is not None:
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


class Follower:
    """A rank > 0: runs every step the leader broadcasts on its own shard, until StopStep.

    `on_prefill_layer_done_factory(step)` gives the per-layer callback of one prefill on this
    rank (to export and send this rank's KV frames), or None. `is_ready(request_id)` says
    whether this rank's KV for a request is complete; it is called from the loop's thread.
    """

    def __init__(
        self,
        engine: NativeEngine,
        control: dist.ProcessGroup | None,
        on_prefill_layer_done_factory: LayerDoneFactory | None = None,
        is_ready: Callable[[str], bool] | None = None,
    ):
        if engine.tp.rank == LEADER:
            raise ValueError("rank 0 leads; followers are ranks 1..tp_size-1")
        self.engine = engine
        self.tables = BlockTables()
        self._control = control
        self._factory = on_prefill_layer_done_factory
        self._is_ready = is_ready
        _handshake(engine, control)

    def run(self) -> None:
        while True:
            received: list[Any] = [None]
            dist.broadcast_object_list(received, group=self._control, group_src=LEADER)
            message: Message = received[0]
            self.tables.drop(message.released)
            step = message.step
            if isinstance(step, StopStep):
                return
            self._run(step)

    def _run(self, step: Step) -> None:
        engine = self.engine
        match step:
            case PrefillStep():
                hook = self._factory(step) if self._factory else None
                guard = _GuardedCallback(hook, step.request_id) if hook else None
                engine.forward_prefill(step.context_ids, step.block_table, guard, want_logits=False)
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


class _GuardedCallback:
    """A layer-done callback whose failure cannot stop this rank's compute: the other ranks
    wait in the same step's all-reduces. The first error is kept and the callback skipped
    from then on; the leader raises it once the step is over, a follower logs it."""

    def __init__(self, callback: LayerDone, request_id: str):
        self.callback = callback
        self.request_id = request_id
        self.error: Exception | None = None

    def __call__(self, layer: int) -> None:
        if self.error is not None:
            return
        try:
            self.callback(layer)
        except Exception as exc:
            self.error = exc
            log.exception("layer-done callback of %s failed at layer %d", self.request_id, layer)


def follower_loop(
    engine: NativeEngine,
    on_prefill_layer_done_factory: LayerDoneFactory | None = None,
    *,
    control: dist.ProcessGroup | None,
    is_ready: Callable[[str], bool] | None = None,
) -> None:
    """`Follower(...).run()`, for a follower that needs no access to its block tables."""
    Follower(engine, control, on_prefill_layer_done_factory, is_ready).run()
