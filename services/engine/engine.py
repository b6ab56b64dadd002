"""The native engine: a model, a paged cache in some layout, prefill and batched decode.

Blocking torch code: services call it from a worker thread, never on the event loop.
"""

from __future__ import annotations

from pathlib import Path

import torch

from proto.layouts import KVDescriptor
from proto.messages import GenerateRequest
from services.engine.kv_cache import BlockAllocator, PagedKVCache
from services.engine.model import AttentionMetadata, LayerDone
from services.engine.sampling import Sampler
from services.engine.sequence import Sequence
from services.engine.stopping import StopChecker
from services.engine.tokenizer import Tokenizer
from services.engine.weights import load_model


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
    ):
        self.device = torch.device(device) if device else default_device()
        self.model, self.cfg = load_model(model_dir, self.device)
        self.tokenizer = Tokenizer.from_model_dir(model_dir)
        self.max_model_len = min(max_model_len or self.cfg.max_position_embeddings,
                                 self.cfg.max_position_embeddings)
        self.kv = KVDescriptor(
            layout=kv_layout,
            block_size=block_size,
            dtype=kv_dtype,
            num_layers=self.cfg.num_layers,
            num_kv_heads=self.cfg.num_kv_heads,
            head_dim=self.cfg.head_dim,
        )
        self.cache = PagedKVCache(self.kv, num_blocks, self.device)
        self.allocator = BlockAllocator(num_blocks, self.kv.spec.reserved_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.kv.block_size)

    def new_sequence(self, request: GenerateRequest) -> Sequence:
        params = request.sampling
        return Sequence(
            request_id=request.request_id,
            context_ids=request.context_token_ids,
            params=params,
            sampler=Sampler(params, self.device),
            stopper=StopChecker(
                params, self.cfg.eos_token_ids, self.tokenizer, request.resumed_token_ids
            ),
            completion_offset=len(request.resumed_token_ids),
        )

    def _slots(self, seq: Sequence, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = torch.tensor(seq.block_table, dtype=torch.long)
        blocks = table[positions // self.kv.block_size]
        return blocks.to(self.device), (positions % self.kv.block_size).to(self.device)

    @torch.inference_mode()
    def prefill(self, seq: Sequence, on_layer_done: LayerDone | None = None) -> int:
        """Run the whole context, leave its KV in seq.block_table, sample the first token."""
        ids = seq.context_ids
        positions = torch.arange(len(ids))
        blocks, offsets = self._slots(seq, positions)
        meta = AttentionMetadata(
            is_prefill=True, positions=positions.to(self.device), slot_blocks=blocks,
            slot_offsets=offsets,
        )
        logits = self.model(
            torch.tensor(ids, device=self.device), meta, self.cache,
            last_token_index=torch.tensor([len(ids) - 1], device=self.device),
            on_layer_done=on_layer_done,
        )
        token = seq.sampler.sample(logits[0])
        seq.append(token)
        return token

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> list[int]:
        """One step for a batch: each sequence's last token goes in, one new token comes out.

        The last token's KV is not in the cache yet (it was just sampled): it is written at
        position num_tokens - 1, then attention reads the whole context from the cache.
        """
        bs = self.kv.block_size
        lengths = torch.tensor([s.num_tokens for s in seqs])
        positions = lengths - 1
        max_len = int(lengths.max())
        width = -(-max_len // bs)
        tables = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            tables[row, : len(seq.block_table[:width])] = torch.tensor(seq.block_table[:width])
        ctx = torch.arange(max_len)
        ctx_blocks = tables[:, ctx // bs]  # [S, Tmax]
        ctx_offsets = (ctx % bs).expand(len(seqs), -1)
        mask = ctx[None, :] < lengths[:, None]
        rows = torch.arange(len(seqs))
        meta = AttentionMetadata(
            is_prefill=False,
            positions=positions.to(self.device),
            slot_blocks=tables[rows, positions // bs].to(self.device),
            slot_offsets=(positions % bs).to(self.device),
            context_blocks=ctx_blocks.to(self.device),
            context_offsets=ctx_offsets.to(self.device),
            context_mask=mask[:, None, None, :].to(self.device),
        )
        tokens = torch.tensor([s.all_ids[-1] for s in seqs], device=self.device)
        logits = self.model(tokens, meta, self.cache, last_token_index=rows.to(self.device))
        out = []
        for seq, row in zip(seqs, logits, strict=True):
            token = seq.sampler.sample(row)
            seq.append(token)
            out.append(token)
        return out
