"""The converter's tensor functions: any layout, TP, block size, dtype and layer range to any
other, against a reference computed here (never with the code under test).

What is compared: target tokens read back equal, bit for bit, `quantize(dequantize(source))`
where source = the canonical tokens stored in the source dtype, dequantize(x) = x * scale
for fp8 (else x), quantize(y) = clamp(y / scale) for fp8 (else a plain cast). For lossless
pairs (same dtype, same scales) that is the source tokens themselves, which is checked too.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.kv_descriptor import KVDescriptor
from proto.layout_registry import LAYOUTS
from services.kv.dtypes import FP8_DTYPES, torch_dtype
from services.kv.payload import payload_to_bytes
from services.kv.relayout import (
    ShardLayer,
    assign_heads,
    cast_kv,
    check_convertible,
    convert_layer,
    merge_shards,
    pieces_for,
    tokens_from_pieces,
)
from services.kv.relayout import plan as relayout_plan
from tests.test_layouts import build_payload, desc_of, exact_values, same_bits

SCALES = [1.0, 0.5, 2.0, 0.037]


def quantize(y: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    if dtype in FP8_DTYPES:
        limit = torch.finfo(dtype).max
        return (y.to(torch.float32) / scale).clamp(-limit, limit).to(dtype)
    return y.to(dtype)


def dequantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x.to(torch.float32) * scale if x.dtype in FP8_DTYPES else x


def shards(desc: KVDescriptor) -> list[KVDescriptor]:
    return [desc.model_copy(update={"tp_rank": r}) for r in range(desc.tp_size)]


@st.composite
def sides(draw: st.DrawFn, heads: int, head_dim: int, layers: int) -> KVDescriptor:
    """Rank 0 of one instance: layout, dtype, block size, TP degree, a layer range."""
    spec = LAYOUTS[draw(st.sampled_from(sorted(LAYOUTS)))]
    start = draw(st.integers(0, layers - 1))
    return KVDescriptor(
        layout=spec.name,
        block_size=draw(st.sampled_from(spec.block_sizes)),
        dtype=draw(st.sampled_from(spec.dtypes)),
        num_layers=layers,
        num_kv_heads=heads,
        head_dim=head_dim,
        tp_size=draw(st.sampled_from([1, 2, 4, 8])),
        layer_start=start,
        layer_stop=draw(st.integers(start + 1, layers)),
    )


def piece_limit(draw: st.DrawFn, desc: KVDescriptor) -> int:
    per_block = desc.payload_nbytes(1)
    return per_block * draw(st.integers(1, 5)) + draw(st.integers(0, per_block - 1))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_layout_to_any_layout(data: st.DataObject) -> None:
    heads = data.draw(st.sampled_from([1, 2, 4]), label="num_kv_heads")
    head_dim = data.draw(st.sampled_from([16, 32, 64]), label="head_dim")
    layers = data.draw(st.integers(1, 4), label="num_layers")
    src = data.draw(sides(heads, head_dim, layers), label="source")
    dst = data.draw(sides(heads, head_dim, layers), label="target")
    num_tokens = data.draw(st.integers(1, 300), label="num_tokens")
    src_scales = (data.draw(st.sampled_from(SCALES)), data.draw(st.sampled_from(SCALES)))
    dst_scales = (data.draw(st.sampled_from(SCALES)), data.draw(st.sampled_from(SCALES)))
    src_limit, dst_limit = piece_limit(data.draw, src), piece_limit(data.draw, dst)
    common = sorted(set(src.layers) & set(dst.layers))
    layer = data.draw(st.sampled_from(common)) if common else None

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    real = [3 * torch.randn(num_tokens, heads, head_dim, generator=g) for _ in range(2)]
    stored = [quantize(x, torch_dtype(src), s) for x, s in zip(real, src_scales, strict=True)]

    sources = []
    for shard in shards(src):
        pieces = pieces_for(shard, *stored, src_limit, scales=src_scales, input_scales=src_scales)
        random.Random(num_tokens).shuffle(pieces)  # frames may arrive in any order
        sources.append(ShardLayer(shard, pieces, src_scales))
    random.Random(heads).shuffle(sources)

    if layer is None:  # the two instances share no layer: the converter must refuse
        with pytest.raises(ValueError, match="outside"):
            convert_layer(sources, dst, num_tokens, dst_limit, layer=src.layer_start)
        return

    merged = merge_shards(
        [(s.desc, *tokens_from_pieces(s.desc, s.pieces, num_tokens)) for s in sources], heads
    )
    for target in shards(dst):
        out = convert_layer(sources, target, num_tokens, dst_limit, scales=dst_scales, layer=layer)
        check_tiling(target, out, num_tokens, dst_limit)
        got = tokens_from_pieces(target, out, num_tokens)
        for plane in range(2):
            expected = quantize(
                dequantize(stored[plane], src_scales[plane]), torch_dtype(dst), dst_scales[plane]
            )[:, target.heads]
            assert same_bits(got[plane], expected)
            if src.dtype == dst.dtype and src_scales[plane] == dst_scales[plane]:
                assert same_bits(got[plane], stored[plane][:, target.heads])
        # the token path (decode, merge, encode) gives the very same bytes
        slow = pieces_for(target, *merged, dst_limit, scales=dst_scales, input_scales=src_scales)
        assert [(a, b, bytes(p)) for a, b, p in slow] == [(a, b, bytes(p)) for a, b, p in out]


@pytest.mark.parametrize("target", sorted(LAYOUTS))
@pytest.mark.parametrize("source", sorted(LAYOUTS))
def test_every_pair_of_layouts(source: str, target: str) -> None:
    """Largest source blocks to smallest target blocks, tp 2 -> tp 4 over 2 KV heads."""
    src = desc_of(source, num_kv_heads=2, tp_size=2, block_size=LAYOUTS[source].block_sizes[-1])
    dst = desc_of(target, num_kv_heads=2, tp_size=4, block_size=LAYOUTS[target].block_sizes[0])
    k, v = torch.randn(150, 2, 32), torch.randn(150, 2, 32)
    sources = [ShardLayer(s, pieces_for(s, k, v, 2 * s.payload_nbytes(1))) for s in shards(src)]
    for shard in shards(dst):
        out = convert_layer(sources, shard, 150, 3 * shard.payload_nbytes(1))
        got_k, got_v = tokens_from_pieces(shard, out, 150)
        assert torch.equal(got_k, k[:, shard.heads]) and torch.equal(got_v, v[:, shard.heads])


def check_tiling(desc: KVDescriptor, out: list, num_tokens: int, limit: int) -> None:
    per_block = desc.payload_nbytes(1)
    expected_start = 0
    for start, stop, payload in out:
        assert isinstance(payload, memoryview) and start == expected_start
        assert start % desc.block_size == 0 and len(payload) <= limit
        assert len(payload) == desc.payload_nbytes(-(-(stop - start) // desc.block_size))
        if stop < num_tokens:  # every piece but the last is as full as the limit allows
            assert len(payload) == limit // per_block * per_block
        expected_start = stop
    assert expected_start == num_tokens


# --- against hand-built payloads ------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "dtype"), [(name, d) for name, spec in LAYOUTS.items() for d in spec.dtypes]
)
def test_reads_and_writes_the_published_layout(layout: str, dtype: str) -> None:
    desc = desc_of(layout, dtype=dtype, block_size=LAYOUTS[layout].block_sizes[-1])
    num_tokens = desc.block_size + 3
    k = exact_values((num_tokens, 4, 32), torch_dtype(desc), 7)
    v = exact_values((num_tokens, 4, 32), torch_dtype(desc), 8)
    data = payload_to_bytes(build_payload(desc, k, v))
    got_k, got_v = tokens_from_pieces(desc, [(0, num_tokens, data)], num_tokens)
    assert same_bits(got_k, k) and same_bits(got_v, v)
    [(start, stop, payload)] = pieces_for(desc, k, v, len(data))
    assert (start, stop) == (0, num_tokens) and bytes(payload) == data  # tail slots zero


def test_payloads_are_ready_for_frames() -> None:
    desc = desc_of("vllm-flash")
    k = torch.randn(20, 4, 32)
    [(_, _, payload)] = pieces_for(desc, k, k, 10**6)
    assert zlib.crc32(payload) == zlib.crc32(bytes(payload))
    assert len(payload) == payload.nbytes == desc.payload_nbytes(2)


def test_tokens_do_not_alias_frames() -> None:
    desc = desc_of("vllm-flash")
    data = payload_to_bytes(build_payload(desc, torch.ones(16, 4, 32), torch.ones(16, 4, 32)))
    k, _ = tokens_from_pieces(desc, [(0, 16, data)], 16)
    k.zero_()
    assert data == payload_to_bytes(
        build_payload(desc, torch.ones(16, 4, 32), torch.ones(16, 4, 32))
    )


def test_fp8_e4m3fn_to_fnuz_is_exact_with_a_doubled_scale() -> None:
    src = desc_of("vllm-flash", dtype="float8_e4m3fn", block_size=16)
    dst = desc_of("vllm-triton", dtype="float8_e4m3fnuz", block_size=16)
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = every[~torch.isnan(every.float())][:248].reshape(2, 4, 31)  # (T, H, D) needs D
    x = torch.cat([finite, finite[..., :1]], dim=-1).repeat(8, 1, 1)[:16]
    pieces = pieces_for(src, x, x, 10**6)
    out = convert_layer([ShardLayer(src, pieces, (0.25, 0.25))], dst, 16, 10**6, scales=(0.5, 0.5))
    k, _ = tokens_from_pieces(dst, out, 16)
    assert torch.equal(k.float() * 0.5, x.float() * 0.25)


def test_fp8_saturates_instead_of_nan() -> None:
    big = torch.tensor([1e6, -1e6, 300.0])
    for dtype in FP8_DTYPES:
        out = cast_kv(big, dtype).float()
        assert not torch.isnan(out).any()
        assert out[0] == torch.finfo(dtype).max and out[1] == -torch.finfo(dtype).max


def test_cast_between_float_dtypes_is_a_plain_cast() -> None:
    x = torch.randn(100)
    assert torch.equal(cast_kv(x, torch.bfloat16, 3.0, 5.0), x.to(torch.bfloat16))


# --- the copy plan's fast paths ---------------------------------------------------------


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Any bit pattern of `dtype`: NaNs with payloads, infinities, -0 and subnormals too."""
    g = torch.Generator().manual_seed(seed)
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[dtype.itemsize]
    info = torch.iinfo(width)
    raw = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64)
    return raw.to(width).view(dtype)


def off_by(data: memoryview, offset: int) -> memoryview:
    """The same bytes starting `offset` bytes into a fresh buffer (frames need not be aligned
    to the wide elements the copy uses)."""
    room = bytearray(offset + data.nbytes)
    room[offset:] = data
    return memoryview(room)[offset:]


FAST_PATHS = [  # (source, target, dtype, source and target block, what the plan does)
    ("vllm-flash", "vllm-cpu", "float32", (32, 32), "shuffle"),  # K transposed by SIMD
    ("vllm-cpu", "vllm-flashinfer", "float32", (32, 32), "shuffle"),  # from strided K
    ("vllm-cpu", "vllm-paged-legacy", "float32", (32, 32), "shuffle"),  # x-pack vs transposed
    ("vllm-flash", "vllm-paged-legacy", "float8_e4m3fn", (16, 16), "shuffle"),  # bytes: V
    ("vllm-flash", "vllm-cpu", "float32", (16, 64), "shuffle"),  # block sizes change
    ("gaudi", "vllm-cpu", "bfloat16", (128, 128), "strips"),  # 2-byte transpose, far rows
    ("sglang", "ascend-310p", "float16", (64, 64), "wide"),  # 32-byte NZ fractals
    ("vllm-paged-legacy", "tensorrt-llm", "bfloat16", (16, 16), "wide"),  # 16-byte x-packs
    ("vllm-flash-hnd", "vllm-flashinfer", "bfloat16", (16, 32), "wide"),  # whole rows
]


def plan_kinds(
    src: KVDescriptor, dst: KVDescriptor, pieces: list, num_tokens: int, limit: int
) -> set[str]:
    ranges = tuple((a, b) for a, b, _ in sorted(pieces, key=lambda p: p[0]))
    plan = relayout_plan.plan_layer(((src, dst.heads, ranges),), dst, num_tokens, limit)
    kinds = set()
    for chunk in plan:
        for move in chunk.moves:
            kinds.add("wide" if move.wide else "shuffle" if move.shuffle else "copy")
        if len(chunk.moves) > 2 * len(ranges):
            kinds.add("strips")
    return kinds


@pytest.mark.parametrize("offset", [0, 4])
@pytest.mark.parametrize(("source", "target", "dtype", "blocks", "kind"), FAST_PATHS)
def test_fast_copies_move_every_bit(
    source: str, target: str, dtype: str, blocks: tuple[int, int], kind: str, offset: int
) -> None:
    """Widened, shuffled and strip copies give the source bits exactly, for any bit pattern,
    frames aligned or not, with a partial last block."""
    src = desc_of(source, dtype=dtype, block_size=blocks[0], head_dim=128)
    dst = desc_of(target, dtype=dtype, block_size=blocks[1], head_dim=128)
    num_tokens = 3 * max(blocks) + 5
    k, v = (random_bits((num_tokens, 4, 128), torch_dtype(src), seed) for seed in (1, 2))
    pieces = pieces_for(src, k, v, 3 * src.payload_nbytes(1))  # cut unlike the target
    pieces = [(a, b, off_by(p, offset)) for a, b, p in pieces]
    limit = 2 * dst.payload_nbytes(1) + 1
    assert kind in plan_kinds(src, dst, pieces, num_tokens, limit)
    out = convert_layer([ShardLayer(src, pieces)], dst, num_tokens, limit)
    check_tiling(dst, out, num_tokens, limit)
    got_k, got_v = tokens_from_pieces(dst, out, num_tokens)
    assert same_bits(got_k, k) and same_bits(got_v, v)
    slow = pieces_for(dst, k, v, limit)  # the token path: the same bytes, zeroed tails too
    assert [bytes(p) for _, _, p in slow] == [bytes(p) for _, _, p in out]


# --- tensor parallelism -----------------------------------------------------------------


def test_assign_heads_takes_one_replica_per_head() -> None:
    replicated = shards(desc_of("vllm-flash", num_kv_heads=2, tp_size=4))
    assert assign_heads(replicated, range(2)) == [(0, range(0, 1)), (2, range(1, 2))]
    split = shards(desc_of("vllm-flash", num_kv_heads=4, tp_size=2))
    assert assign_heads(split, range(1, 4)) == [(0, range(1, 2)), (1, range(2, 4))]
    with pytest.raises(ValueError, match=r"head\(s\) \[2, 3\]"):
        assign_heads(split[:1], range(4))


def test_merge_shards_checks_replicas() -> None:
    replicas = shards(desc_of("vllm-flash", num_kv_heads=1, tp_size=2))
    k, other = torch.randn(5, 1, 32), torch.randn(5, 1, 32)
    merged = merge_shards([(replicas[0], k, k), (replicas[1], k, k)], 1)
    assert torch.equal(merged[0], k)
    mixed = [(replicas[0], k, k), (replicas[1], other, k)]
    with pytest.raises(ValueError, match="replicas in shards 0 and 1 differ"):
        merge_shards(mixed, 1)
    assert torch.equal(merge_shards(mixed, 1, check_replicas=False)[0], k)


def test_merge_shards_rejects_missing_and_misshapen_shards() -> None:
    split = shards(desc_of("vllm-flash", num_kv_heads=4, tp_size=2))
    k = torch.randn(5, 2, 32)
    with pytest.raises(ValueError, match=r"head\(s\) \[2, 3\]"):
        merge_shards([(split[0], k, k)], 4)
    with pytest.raises(ValueError, match="expected"):
        merge_shards([(split[0], k, k), (split[1], k[:4], k[:4])], 4)
    with pytest.raises(ValueError, match="KV heads"):
        merge_shards([(split[0], k, k)], 8)
    with pytest.raises(ValueError, match="at least one"):
        merge_shards([], 4)


# --- bad pieces and impossible conversions ------------------------------------------------


def frames(desc: KVDescriptor, num_tokens: int, limit: int) -> list:
    k = torch.randn(num_tokens, len(desc.heads), desc.head_dim)
    return [(a, b, bytes(p)) for a, b, p in pieces_for(desc, k, k, limit, heads=desc.heads)]


@pytest.fixture
def flash() -> KVDescriptor:
    return desc_of("vllm-flash", block_size=16)


def test_pieces_may_come_in_any_order(flash: KVDescriptor) -> None:
    pieces = frames(flash, 50, flash.payload_nbytes(1))
    forward = tokens_from_pieces(flash, pieces, 50)
    backward = tokens_from_pieces(flash, pieces[::-1], 50)
    assert torch.equal(forward[0], backward[0])


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda p: p[1:], r"tokens \[0, 16\) are missing"),
        (lambda p: p[:-1], r"tokens \[48, 50\) are missing"),
        (lambda p: [p[0], p[2], p[3]], r"tokens \[16, 32\) are missing"),
        (lambda p: [*p, p[1]], "overlaps"),
        (lambda p: [p[0], (16, 40, p[1][2] + p[2][2]), *p[2:]], "overlaps"),
        (lambda p: [(0, 16, p[0][2][:-1]), *p[1:]], "bytes; 1 block"),
        (lambda p: [(0, 16, p[0][2] + b"\0"), *p[1:]], "bytes; 1 block"),
        (lambda p: [(0, 20, p[0][2] + p[1][2]), (20, 50, p[1][2] + p[2][2])], "inside a block"),
        (lambda p: [*p[:-1], (48, 60, p[-1][2])], "outside"),
    ],
)
def test_bad_pieces_are_rejected(flash: KVDescriptor, mangle, message: str) -> None:
    pieces = frames(flash, 50, flash.payload_nbytes(1))
    with pytest.raises(ValueError, match=message):
        tokens_from_pieces(flash, mangle(pieces), 50)


def test_a_layer_has_tokens(flash: KVDescriptor) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        tokens_from_pieces(flash, [], 0)


def test_one_block_must_fit_a_payload(flash: KVDescriptor) -> None:
    k = torch.randn(20, 4, 32)
    with pytest.raises(ValueError, match="over the payload limit"):
        pieces_for(flash, k, k, flash.payload_nbytes(1) - 1)


def test_pieces_for_checks_its_tokens(flash: KVDescriptor) -> None:
    k = torch.randn(20, 4, 32)
    with pytest.raises(ValueError, match="expected"):
        pieces_for(flash, k, k[:, :3], 10**6)
    shard = flash.model_copy(update={"tp_size": 2, "tp_rank": 1})
    with pytest.raises(ValueError, match="needs range"):
        pieces_for(shard, k[:, :2], k[:, :2], 10**6, heads=range(0, 2))
    assert len(pieces_for(shard, k[:, 2:], k[:, 2:], 10**6, heads=range(2, 4))) == 1


def test_convert_refuses_another_model(flash: KVDescriptor) -> None:
    source = ShardLayer(flash, frames(flash, 20, 10**6))
    with pytest.raises(ValueError, match="head_dim"):
        convert_layer([source], desc_of("vllm-flash", head_dim=64), 20, 10**6)
    with pytest.raises(ValueError, match="num_layers"):
        check_convertible(flash, desc_of("vllm-flash", num_layers=2))


def test_convert_checks_layer_ranges(flash: KVDescriptor) -> None:
    stage = flash.model_copy(update={"layer_start": 0, "layer_stop": 2})
    source = ShardLayer(stage, frames(stage, 20, 10**6))
    later = desc_of("vllm-flash-hnd", layer_start=2)
    with pytest.raises(ValueError, match="layer 1 is outside vllm-flash-hnd"):
        convert_layer([source], later, 20, 10**6, layer=1)
    with pytest.raises(ValueError, match="layer 3 is outside vllm-flash"):
        convert_layer([source], later, 20, 10**6, layer=3)


def test_convert_needs_every_target_head(flash: KVDescriptor) -> None:
    half = flash.model_copy(update={"tp_size": 2, "tp_rank": 0})
    source = ShardLayer(half, frames(half, 20, 10**6))
    assert len(convert_layer([source], half, 20, 10**6)) == 1
    with pytest.raises(ValueError, match=r"head\(s\) \[2, 3\]"):
        convert_layer([source], flash, 20, 10**6)


@pytest.mark.parametrize(("source", "target"), [("vllm-flash", "ascend"), ("ascend", "vllm-cpu")])
def test_a_stream_that_starts_after_a_cached_prefix(source: str, target: str) -> None:
    """The receiver holds the first blocks already: pieces from there convert to the same
    bytes as the whole layer's pieces from there on."""
    src = desc_of(source, block_size=16 if source != "ascend" else 128)
    dst = desc_of(target, block_size=128 if target == "ascend" else 32)
    num_tokens, first = 300, 128
    pieces = frames(src, num_tokens, src.payload_nbytes(1))
    whole = convert_layer([ShardLayer(src, pieces)], dst, num_tokens, dst.payload_nbytes(1))
    tail = [p for p in pieces if p[0] >= first]
    part = convert_layer(
        [ShardLayer(src, tail)], dst, num_tokens, dst.payload_nbytes(1), first=first
    )
    want = [(a, b, bytes(p)) for a, b, p in whole if a >= first]
    assert [(a, b, bytes(p)) for a, b, p in part] == want and want
    with pytest.raises(ValueError, match="missing"):
        convert_layer([ShardLayer(src, tail[1:])], dst, num_tokens, 1 << 20, first=first)
