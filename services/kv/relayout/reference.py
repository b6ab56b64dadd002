"""The simple path through tokens: pieces -> tokens (T, H, D) -> merged shards -> pieces.

It materialises the layer's tokens (copies: piece -> tokens, merge across shards when several,
tokens -> payload); convert_layer gives the same bytes without. The tests use it as the
reference, the benchmarks and tests to build pieces from tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from proto.kv_descriptor import KVDescriptor
from services.kv.dtypes import bits, torch_dtype
from services.kv.relayout.casting import casters, plain
from services.kv.relayout.pieces import (
    UNIT_SCALES,
    KVScales,
    OutPiece,
    Piece,
    assign_heads,
    chunk_ranges,
)
from services.kv.relayout.runs import copy_run, new_run, runs_of, token_run


def tokens_from_pieces(
    desc: KVDescriptor, pieces: Sequence[Piece], num_tokens: int
) -> tuple[Tensor, Tensor]:
    """K, V (num_tokens, H_shard, D) in desc's dtype from one shard's pieces of one layer."""
    shape = (num_tokens, len(desc.heads), desc.head_dim)
    k = torch.empty(shape, dtype=torch_dtype(desc))
    v = torch.empty(shape, dtype=torch_dtype(desc))
    out = token_run(k, v, desc.heads)
    for run in runs_of(desc, pieces, num_tokens):
        copy_run(out, run, desc.heads, plain, plain)
    return k, v


def merge_shards(
    shards: Sequence[tuple[KVDescriptor, Tensor, Tensor]],
    num_kv_heads: int,
    *,
    heads: range | None = None,
    check_replicas: bool = True,
) -> tuple[Tensor, Tensor]:
    """K, V (T, len(heads), D) for `heads` (default: all) from tokens of several TP shards.

    Replicas (tp > num_kv_heads) are compared bit for bit unless `check_replicas` is off: they
    are equal when every rank computed its copy from the same weights and inputs, and a
    mismatch means frames were mixed up. The result may be a view of an input.
    """
    heads = range(num_kv_heads) if heads is None else heads
    if not shards:
        raise ValueError("merge_shards needs at least one shard")
    first = shards[0][1]
    for desc, k, v in shards:
        if desc.num_kv_heads != num_kv_heads:
            raise ValueError(
                f"shard {desc.tp_rank} has {desc.num_kv_heads} KV heads, not {num_kv_heads}"
            )
        want = (first.shape[0], len(desc.heads), first.shape[2])
        if k.shape != want or v.shape != want or k.dtype != first.dtype or v.dtype != first.dtype:
            raise ValueError(
                f"shard {desc.tp_rank}: K {tuple(k.shape)} {k.dtype}, V {tuple(v.shape)} "
                f"{v.dtype}; expected {want} {first.dtype}"
            )
    groups = assign_heads([s[0] for s in shards], heads)
    if check_replicas:
        _check_replicas(shards, heads)
    parts_k, parts_v = [], []
    for index, taken in groups:
        desc, k, v = shards[index]
        offset = taken.start - desc.heads.start
        parts_k.append(k.narrow(1, offset, len(taken)))
        parts_v.append(v.narrow(1, offset, len(taken)))
    if len(groups) == 1:
        return parts_k[0], parts_v[0]
    return torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1)


def pieces_for(
    desc: KVDescriptor,
    k_all: Tensor,
    v_all: Tensor,
    max_payload_bytes: int,
    *,
    heads: range | None = None,
    scales: KVScales = UNIT_SCALES,
    input_scales: KVScales = UNIT_SCALES,
) -> list[OutPiece]:
    """Payloads of desc's shard for tokens K, V (T, len(heads), D), `heads` defaulting to all
    KV heads: desc's heads selected, cast to desc's dtype (fp8: quantised with `scales`; fp8
    inputs dequantised with `input_scales`), cut into pieces of whole blocks of at most
    `max_payload_bytes` each."""
    heads = range(desc.num_kv_heads) if heads is None else heads
    want = (k_all.shape[0], len(heads), desc.head_dim)
    if k_all.shape != want or v_all.shape != want:
        raise ValueError(f"K {tuple(k_all.shape)}, V {tuple(v_all.shape)}; expected {want}")
    if desc.heads.start < heads.start or desc.heads.stop > heads.stop:
        raise ValueError(f"tokens hold heads {heads}; shard {desc.tp_rank} needs {desc.heads}")
    source = token_run(k_all, v_all, heads)
    k_cast, v_cast = casters(k_all.dtype, input_scales, torch_dtype(desc), scales)
    out = []
    for start, stop in chunk_ranges(desc, k_all.shape[0], max_payload_bytes):
        run, buffer = new_run(desc, start, stop)
        copy_run(run, source, desc.heads, k_cast, v_cast)
        out.append((start, stop, memoryview(buffer.numpy())))
    return out


def _check_replicas(shards: Sequence[tuple[KVDescriptor, Tensor, Tensor]], heads: range) -> None:
    seen: dict[int, tuple[int, Tensor, Tensor]] = {}
    for i, (desc, k, v) in enumerate(shards):
        for h in desc.heads:
            if h not in heads:
                continue
            k_h, v_h = bits(k[:, h - desc.heads.start]), bits(v[:, h - desc.heads.start])
            if h not in seen:
                seen[h] = (i, k_h, v_h)
            elif not (torch.equal(seen[h][1], k_h) and torch.equal(seen[h][2], v_h)):
                raise ValueError(f"KV head {h}: replicas in shards {seen[h][0]} and {i} differ")
