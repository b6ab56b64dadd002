"""Runs: contiguous blocks of one side of a copy, seen as canonical views, and the strided
copies that move the tokens two runs share (their block sizes nest)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from proto.kv_descriptor import KVDescriptor
from services.kv.dtypes import bits
from services.kv.payload import readonly_bytes, split_payload
from services.kv.relayout.casting import Cast
from services.kv.relayout.pieces import Piece, sorted_pieces
from services.kv.views import kv_views


@dataclass(frozen=True)
class Run:
    """Tokens [start, stop) of heads `heads` as K and V views (n, B, H, D) or
    (n, B, H, D/x, x); `start` is a multiple of `block_size`."""

    start: int
    stop: int
    block_size: int
    heads: range
    k: Tensor
    v: Tensor


def token_run(k: Tensor, v: Tensor, heads: range) -> Run:
    """Plain tokens (T, H, D) as blocks of one token: any block size nests with them."""
    return Run(0, k.shape[0], 1, heads, k.unsqueeze(1), v.unsqueeze(1))


def runs_of(desc: KVDescriptor, pieces: Sequence[Piece], num_tokens: int) -> list[Run]:
    """Validated pieces as runs; they must tile [0, num_tokens) exactly."""
    runs = []
    for start, stop, data in sorted_pieces(desc, pieces, num_tokens):
        runs.append(run_over(desc, start, stop, readonly_bytes(data)))
    return runs


def run_over(desc: KVDescriptor, start: int, stop: int, flat: Tensor) -> Run:
    """Tokens [start, stop) of a payload held in the flat uint8 tensor `flat`."""
    blocks = desc.blocks_for(stop - start)
    k, v = kv_views(desc, split_payload(desc, flat, blocks), blocks)
    return Run(start, stop, desc.block_size, desc.heads, k, v)


def new_run(desc: KVDescriptor, start: int, stop: int) -> tuple[Run, Tensor]:
    """An empty payload for tokens [start, stop) and its flat byte buffer."""
    blocks = desc.blocks_for(stop - start)
    buffer = torch.empty(desc.payload_nbytes(blocks), dtype=torch.uint8)
    run = run_over(desc, start, stop, buffer)
    for view in tail_slots(run):  # past the last token: zeros, not what the allocator held
        view.zero_()
    return run, buffer


def tail_slots(run: Run) -> list[Tensor]:
    """Integer views of the K and V slots past the run's last token (none if it fills its
    last block)."""
    tail = (run.stop - run.start) % run.block_size
    return [bits(view[-1, tail:]) for view in (run.k, run.v)] if tail else []


def copy_run(dst: Run, src: Run, heads: range, k_cast: Cast, v_cast: Cast) -> None:
    """dst[t, h] = cast(src[t, h]) for the tokens both runs cover and heads in all three."""
    for plane, d, s in pairs(dst, src, heads):
        d.copy_((k_cast, v_cast)[plane](s))


def pairs(dst: Run, src: Run, heads: range) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(plane: 0 for K, 1 for V, dst view, src view of the same shape): the strided copies
    that move the tokens both runs cover, for heads in all three."""
    t0, t1 = max(dst.start, src.start), min(dst.stop, src.stop)
    h0 = max(dst.heads.start, src.heads.start, heads.start)
    h1 = min(dst.heads.stop, src.heads.stop, heads.stop)
    if t0 >= t1 or h0 >= h1:
        return
    u, U = sorted((dst.block_size, src.block_size))
    if U % u:
        raise ValueError(f"block sizes {u} and {U} do not nest")
    segments = list(_segments(t0, t1, u, U))
    for plane, (d_plane, s_plane) in enumerate(((dst.k, src.k), (dst.v, src.v))):
        d_plane = _narrow_heads(d_plane, dst.heads, h0, h1)
        s_plane = _narrow_heads(s_plane, src.heads, h0, h1)
        if d_plane.shape[2:] != s_plane.shape[2:]:
            d_plane, s_plane = _align_head_dim(d_plane, s_plane)
        for a, b, kind in segments:
            d = _segment(d_plane, a - dst.start, b - dst.start, dst.block_size, kind, u, U)
            s = _segment(s_plane, a - src.start, b - src.start, src.block_size, kind, u, U)
            yield plane, d, s


def _narrow_heads(view: Tensor, heads: range, h0: int, h1: int) -> Tensor:
    if heads.start == h0 and heads.stop == h1:
        return view
    return view.narrow(2, h0 - heads.start, h1 - h0)


def _align_head_dim(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Split the head dim of two canonical views, (..., D) or (..., D/p, p), into the same
    (D/hi, hi/lo, lo), lo and hi being the smaller and larger pack: always views."""
    packs = [t.shape[-1] if t.dim() == 5 else 1 for t in (x, y)]
    lo, hi = sorted(packs)
    if hi % lo:
        raise ValueError(f"packs of {lo} and {hi} elements do not nest")
    out = []
    for t, pack in zip((x, y), packs, strict=True):
        if pack == 1:
            out.append(t.unflatten(-1, (-1, hi // lo, lo)))
        elif pack == lo:
            out.append(t.unflatten(-2, (-1, hi // lo)))
        else:
            out.append(t.unflatten(-1, (hi // lo, lo)))
    return out[0], out[1]


def _segments(t0: int, t1: int, u: int, U: int) -> Iterator[tuple[int, int, str]]:
    """Split [t0, t1) (t0 a multiple of u) so that each part is one strided copy on both
    sides: whole U-blocks ("blocks"), whole u-chunks inside one U-block ("chunks"), or rows
    inside one u-chunk ("rows")."""
    first_full = min(t1, -(-t0 // U) * U)
    last_full = max(first_full, t1 // U * U)
    yield from _within(t0, first_full, u)
    if first_full < last_full:
        yield first_full, last_full, "blocks"
    yield from _within(last_full, t1, u)


def _within(a: int, b: int, u: int) -> Iterator[tuple[int, int, str]]:
    whole = a + (b - a) // u * u
    if a < whole:
        yield a, whole, "chunks"
    if whole < b:
        yield whole, b, "rows"


def _segment(view: Tensor, p: int, q: int, B: int, kind: str, u: int, U: int) -> Tensor:
    """Tokens [p, q) (counted from the run's start) of a (n, B, H, ...) view, shaped alike on
    both sides of a copy: blocks (n, U/u, u, H, ...), chunks (n, u, H, ...), rows (n, H, ...)."""
    if kind == "blocks":
        picked = view[p // B : q // B]
        if u == U:
            return picked
        return picked.unflatten(1, (U // u, u)) if B == U else picked.unflatten(0, (-1, U // u))
    if kind == "chunks":
        if B == u:
            return view[p // u : q // u]
        first = p % U // u
        return view[p // U].unflatten(0, (U // u, u))[first : first + (q - p) // u]
    return view[p // B, p % B : p % B + (q - p)]
