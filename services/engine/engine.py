"""The native engine: a model, a paged cache in some layout, prefill and batched decode.

Blocking torch code: services call it from a worker thread, never on the event loop.
With tp_size > 1 the engine is one rank of a tensor-parallel instance: it holds that rank's
shard of the weights and of the KV heads, and every rank must run the same steps in the same
order (services/engine/tp/ does that); `forward_prefill` / `forward_decode` are the steps
without sampling, for ranks that only compute. What to compute in each step is the
scheduler's (scheduler.py) decision; which blocks are whose, the block manager's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from proto.kv_descriptor import KVDescriptor
from proto.messages import GenerateRequest
from services.engine.block_manager import BlockManager
from services.engine.kv_cache import PagedKVCache
from services.engine.model import AttentionMetadata, LayerDone, PrefillSpan
from services.engine.parallel import checked_tp_group
from services.engine.sampling import Sampler
from services.engine.scheduler import PrefillChunk
from services.engine.sequence import Sequence
from services.engine.weights import load_model
from services.hf.tokenizer import Tokenizer


@dataclass(frozen=True)
class PrefillInput:
    """What every tensor-parallel rank needs of one sequence's chunk in a prefill step."""

    token_ids: list[int]  # context tokens [start, stop)
    start: int
    block_table: list[int]
    want_logits: bool  # the chunk completes the prompt: its last token's logits sample

    @property
    def stop(self) -> int:
        return self.start + len(self.token_ids)


def prefill_input(chunk: PrefillChunk) -> PrefillInput:
    seq = chunk.seq
    return PrefillInput(
        seq.context_ids[chunk.start : chunk.stop],
        chunk.start,
        list(seq.block_table),
        chunk.completes_prompt,
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class NativeEngine:
    def __init__(
        self,
        model_dir: str | Path,
        kv_layout: str,
        block_size: int,
        kv_dtype: str,
        num_blocks: int,
        device: torch.device | str | None = None,
        max_model_len: int | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        tp_group: dist.ProcessGroup | None = None,
        prefix_caching: bool = False,
    ):
        self.device = torch.device(device) if device else default_device()
        self.tp = checked_tp_group(tp_rank, tp_size, tp_group)
        self.model, self.cfg = load_model(model_dir, self.device, tp=self.tp)
        self.tokenizer = Tokenizer.from_model_dir(model_dir)
        self.max_model_len = min(
            max_model_len or self.cfg.max_position_embeddings, self.cfg.max_position_embeddings
        )
        self.kv = KVDescriptor(
            layout=kv_layout,
            block_size=block_size,
            dtype=kv_dtype,
            num_layers=self.cfg.num_layers,
            num_kv_heads=self.cfg.num_kv_heads,
            head_dim=self.cfg.head_dim,
            tp_size=tp_size,
            tp_rank=tp_rank,
        )
        self.cache = PagedKVCache(self.kv, num_blocks, self.device)
        self.blocks = BlockManager(
            num_blocks, block_size, self.kv.spec.reserved_blocks, prefix_caching=prefix_caching
        )

    def blocks_for(self, num_tokens: int) -> int:
        return self.kv.blocks_for(num_tokens)

    def new_sequence(self, request: GenerateRequest) -> Sequence:
        sampler = Sampler(request.sampling, self.device)
        return Sequence.from_request(request, self.cfg.eos_token_ids, self.tokenizer, sampler)

    def check_blocks(self, block_table: list[int], num_tokens: int) -> None:
        """Raise unless `block_table` has room for `num_tokens` tokens."""
        need = self.blocks_for(num_tokens)
        if len(block_table) < need:
            raise ValueError(
                f"{num_tokens} tokens need {need} KV blocks, the table has {len(block_table)}"
            )

    def _slots(
        self, block_table: list[int], positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.tensor(block_table, dtype=torch.long)
        blocks = table[positions // self.kv.block_size]
        return blocks.to(self.device), (positions % self.kv.block_size).to(self.device)

    @torch.inference_mode()
    def prefill(self, seq: Sequence, on_layer_done: LayerDone | None = None) -> int:
        """Compute the rest of one sequence's context in one step and sample its first token
        (its blocks must be held)."""
        chunk = PrefillChunk(seq, seq.num_computed, len(seq.context_ids))
        [token] = self.prefill_step([chunk], on_layer_done)
        assert token is not None
        return token

    @torch.inference_mode()
    def prefill_step(
        self, chunks: list[PrefillChunk], on_layer_done: LayerDone | None = None
    ) -> list[int | None]:
        """One prefill step over several sequences' chunks; a chunk that completes its prompt
        samples the sequence's first token (appended to it), the others give None."""
        rows = [prefill_input(chunk) for chunk in chunks]
        logits = self.forward_prefill(rows, on_layer_done)
        out: list[int | None] = []
        sampled = iter(logits)
        for chunk, row in zip(chunks, rows, strict=True):
            chunk.seq.num_computed = chunk.stop
            if not row.want_logits:
                out.append(None)
                continue
            seq = chunk.seq
            assert seq.sampler is not None
            token = seq.sampler.sample(next(sampled))
            seq.append(token)
            out.append(token)
        return out

    @torch.inference_mode()
    def forward_prefill(
        self,
        rows: list[PrefillInput],
        on_layer_done: LayerDone | None = None,
        want_logits: bool = True,
    ) -> torch.Tensor:  # [rows wanting logits, vocab] float32 ([0, vocab] without logits)
        positions, blocks, offsets, spans, last = [], [], [], [], []
        begin = 0
        for row in rows:
            self.check_blocks(row.block_table, row.stop)
            where = torch.arange(row.start, row.stop)
            block, offset = self._slots(row.block_table, where)
            positions.append(where)
            blocks.append(block)
            offsets.append(offset)
            end = begin + row.stop - row.start
            table = None
            if row.start > 0:
                used = row.block_table[: self.blocks_for(row.stop)]
                table = torch.tensor(used, dtype=torch.long, device=self.device)
            spans.append(PrefillSpan(begin, end, row.start, table))
            if row.want_logits and want_logits:
                last.append(end - 1)
            begin = end
        meta = AttentionMetadata(
            is_prefill=True,
            positions=torch.cat(positions).to(self.device),
            slot_blocks=torch.cat(blocks),
            slot_offsets=torch.cat(offsets),
            spans=tuple(spans),
        )
        tokens = torch.tensor([t for row in rows for t in row.token_ids], device=self.device)
        return self.model(
            tokens,
            meta,
            self.cache,
            last_token_index=torch.tensor(last, dtype=torch.long, device=self.device),
            on_layer_done=on_layer_done,
        )

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> list[int]:
        """One step for a batch: each sequence's last token goes in, one new token comes out."""
        logits = self.forward_decode(
            [s.last_token for s in seqs],
            [s.num_tokens for s in seqs],
            [s.block_table for s in seqs],
        )
        out = []
        for seq, row in zip(seqs, logits, strict=True):
            seq.num_computed = seq.num_tokens  # the step wrote its last token's KV
            token = seq.sampler.sample(row)
            seq.append(token)
            out.append(token)
        return out

    @torch.inference_mode()
    def forward_decode(
        self,
        last_tokens: list[int],
        num_tokens: list[int],
        block_tables: list[list[int]],
        want_logits: bool = True,
    ) -> torch.Tensor:  # [S, vocab] float32, or [0, vocab] without logits
        """Sequence i has num_tokens[i] tokens, the last of them last_tokens[i], whose KV is not
        in the cache yet (it was just sampled): it is written at position num_tokens[i] - 1,
        then attention reads the whole context from the cache."""
        for table, count in zip(block_tables, num_tokens, strict=True):
            self.check_blocks(table, count)
        bs = self.kv.block_size
        lengths = torch.tensor(num_tokens)
        positions = lengths - 1
        max_len = int(lengths.max())
        width = -(-max_len // bs)
        tables = torch.zeros(len(block_tables), width, dtype=torch.long)
        for row, table in enumerate(block_tables):
            tables[row, : len(table[:width])] = torch.tensor(table[:width])
        mask = None
        if min(num_tokens) < max_len:
            mask = (torch.arange(max_len)[None, :] < lengths[:, None])[:, None, None, :]
            mask = mask.to(self.device)
        rows = torch.arange(len(block_tables))
        meta = AttentionMetadata(
            is_prefill=False,
            positions=positions.to(self.device),
            slot_blocks=tables[rows, positions // bs].to(self.device),
            slot_offsets=(positions % bs).to(self.device),
            context_tables=tables.to(self.device),
            context_len=max_len,
            context_mask=mask,
        )
        tokens = torch.tensor(last_tokens, device=self.device)
        logits_rows = rows if want_logits else rows[:0]
        return self.model(tokens, meta, self.cache, last_token_index=logits_rows.to(self.device))
