"""What an engine computes next: a step plan, decided without I/O and without torch.

Two queues, as nano-vllm's: `waiting` sequences still need (part of) their context computed
(prefill), `running` ones decode a token per step. A step is either a prefill step (chunks of
waiting prompts, batched up to a token budget: a long prompt is computed over several steps,
chunked prefill) or a decode step (the running batch), prefill first. A sequence whose context
is computed joins the running batch if the instance decodes, else leaves (a prefill-only
instance). When a running sequence needs a block and none is free, the newest running
sequences are preempted: their blocks go back and the caller decides what becomes of them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.engine.block_manager import BlockManager
from services.engine.sequence import Sequence


@dataclass(frozen=True)
class PrefillChunk:
    """Context tokens [start, stop) of `seq` computed in this step (start = its num_computed)."""

    seq: Sequence
    start: int
    stop: int

    @property
    def completes_prompt(self) -> bool:
        return self.stop == len(self.seq.context_ids)


@dataclass
class StepPlan:
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_batch_size: int,
        max_batched_tokens: int,
        decodes: bool = True,
    ):
        """`max_batched_tokens`: the prefill tokens of one step; `decodes`: whether finished
        prompts join the running batch (a prefill-only instance: no)."""
        self.blocks = blocks
        self.max_batch_size = max_batch_size
        self.max_batched_tokens = max_batched_tokens
        self.decodes = decodes
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def queued_tokens(self) -> int:
        """Context tokens still to prefill."""
        return sum(len(seq.context_ids) - seq.num_computed for seq in self.waiting)

    def add(self, seq: Sequence) -> None:
        """A sequence to prefill from its num_computed on; it gets blocks when scheduled."""
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose context KV is in its blocks already (transferred): decode it."""
        seq.num_computed = max(seq.num_computed, len(seq.context_ids))
        self.running.append(seq)

    def remove(self, request_id: str) -> Sequence | None:
        """Take a sequence out (aborted, failed) and free its blocks."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._free(seq)
                    return seq
        return None

    def finish(self, seqs: Iterable[Sequence]) -> None:
        """Sequences done (finished, or prefill-only and prefilled): out, blocks freed."""
        done = {id(s) for s in seqs}
        self.running = [s for s in self.running if id(s) not in done]
        self.waiting = deque(s for s in self.waiting if id(s) not in done)
        for seq in seqs:
            self._free(seq)

    def _free(self, seq: Sequence) -> None:
        """Blocks back; the full ones it computed stay cached for a later prompt's prefix."""
        if seq.block_table:
            self.blocks.cache_prefix(seq.block_table, seq.all_ids[: seq.num_computed])
            self.blocks.free(seq.block_table)
            seq.block_table = []

    def schedule(self) -> StepPlan:
        plan = StepPlan(prefill=self._prefill_chunks())
        if plan.prefill:
            return plan
        plan.decode, plan.preempted = self._decode_batch()
        return plan

    def _prefill_chunks(self) -> list[PrefillChunk]:
        budget = self.max_batched_tokens
        room = self.max_batch_size - (len(self.running) if self.decodes else 0)
        chunks: list[PrefillChunk] = []
        for seq in list(self.waiting):
            if budget <= 0 or len(chunks) >= room:
                break
            if not seq.block_table and not self._allocate_prompt(seq):
                break  # first come, first served: later prompts wait for this one's blocks
            start = seq.num_computed
            stop = min(len(seq.context_ids), start + budget)
            chunks.append(PrefillChunk(seq, start, stop))
            budget -= stop - start
        return chunks

    def _allocate_prompt(self, seq: Sequence) -> bool:
        """Blocks for the whole context (plus the first output token when it decodes here),
        reusing a cached prefix; False if they are not free now."""
        blocks = self.blocks
        # at least one token is computed: its logits give the first output token
        cached = blocks.match_prefix(
            seq.context_ids, (len(seq.context_ids) - 1) // blocks.block_size
        )
        total = len(seq.context_ids) + (1 if self.decodes else 0)
        missing = blocks.blocks_for(total) - len(cached)
        if missing > blocks.num_free:
            blocks.free(cached)
            return False
        seq.block_table.extend(cached + blocks.allocate(missing))
        seq.num_computed = seq.num_cached = len(cached) * blocks.block_size
        return True

    def prefilled(self, chunks: Iterable[PrefillChunk]) -> list[Sequence]:
        """After a prefill step: record what was computed; sequences whose context is now
        complete leave `waiting` (into `running` when this instance decodes) and are returned."""
        done = []
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed = chunk.stop
            self.blocks.cache_prefix(seq.block_table, seq.context_ids[: chunk.stop])
            if chunk.completes_prompt:
                self.waiting.remove(seq)
                done.append(seq)
                if self.decodes and not seq.finished:
                    self.running.append(seq)
        return done

    def _decode_batch(self) -> tuple[list[Sequence], list[Sequence]]:
        """Every running sequence gets the block its next token needs; when none is free, the
        newest give theirs back (preempted)."""
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted for an older one
                continue
            missing = self.blocks.blocks_for(seq.num_tokens) - len(seq.block_table)
            while missing > 0 and self.blocks.num_free < missing:
                victim = self.running.pop()
                self._free(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq in self.running and missing > 0:
                seq.block_table.extend(self.blocks.allocate(missing))
        return self.running[: self.max_batch_size], preempted
