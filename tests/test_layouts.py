"""Layout registry and views, checked against each engine's published shape formula.

`PUBLISHED` restates, per layout, the storage shapes and where K/V of token t, head h, dim d
sit, written from the engines' own formulas (shared/research/kv-layouts.md), independently
of `plane_view`. Every registered layout must have an entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.kv_descriptor import KVDescriptor
from proto.layout_registry import LAYOUTS, get_layout, register
from proto.layout_spec import Plane
from services.kv.dtypes import DTYPES, bits, torch_dtype
from services.kv.payload import (
    gather_payload,
    new_payload,
    payload_buffer,
    payload_from_bytes,
    payload_from_tokens,
    payload_to_bytes,
    payload_to_tokens,
    scatter_payload,
)
from services.kv.views import kv_views

Index = tuple[str, tuple]  # storage tensor name, index into its published shape
Shapes = Callable[[SimpleNamespace], dict[str, tuple[int, ...]]]
Where = Callable[[SimpleNamespace, object, object, object, object, int], tuple[Index, Index]]


def _cpu_offset(s: SimpleNamespace, n, h, offset) -> tuple:
    """Element `offset` of block n, head h of a (N, H, B, 2*D) tensor."""
    return (n, h, offset // (2 * s.D), offset % (2 * s.D))


def _legacy_k(s: SimpleNamespace, n, b, h, d) -> tuple:
    """K [N, H, D/x, B, x] flattened into a block's B*H*D elements."""
    return (0, n, ((h * (s.D // s.x) + d // s.x) * s.B + b) * s.x + d % s.x)


PUBLISHED: dict[str, tuple[Shapes, Where]] = {
    "vllm-flash": (
        lambda s: {"kv": (2, s.N, s.B, s.H, s.D)},
        lambda s, n, b, h, d, layer: (("kv", (0, n, b, h, d)), ("kv", (1, n, b, h, d))),
    ),
    "vllm-flash-hnd": (
        lambda s: {"kv": (2, s.N, s.H, s.B, s.D)},
        lambda s, n, b, h, d, layer: (("kv", (0, n, h, b, d)), ("kv", (1, n, h, b, d))),
    ),
    "vllm-flashinfer": (
        lambda s: {"kv": (s.N, 2, s.B, s.H, s.D)},
        lambda s, n, b, h, d, layer: (("kv", (n, 0, b, h, d)), ("kv", (n, 1, b, h, d))),
    ),
    "vllm-triton": (
        lambda s: {"kv": (s.N, 2, s.B, s.H, s.D)},
        lambda s, n, b, h, d, layer: (("kv", (n, 0, b, h, d)), ("kv", (n, 1, b, h, d))),
    ),
    "vllm-paged-legacy": (
        lambda s: {"kv": (2, s.N, s.B * s.H * s.D)},
        lambda s, n, b, h, d, layer: (
            ("kv", _legacy_k(s, n, b, h, d)),
            ("kv", (1, n, (h * s.D + d) * s.B + b)),  # V [N, H, D, B]
        ),
    ),
    "vllm-cpu": (
        lambda s: {"kv": (s.N, s.H, s.B, 2 * s.D)},
        lambda s, n, b, h, d, layer: (
            ("kv", _cpu_offset(s, n, h, d * s.B + b)),  # K transposed [D, B]
            ("kv", _cpu_offset(s, n, h, s.B * s.D + b * s.D + d)),  # then V [B, D]
        ),
    ),
    # vLLM 0.32 FLASH_ATTN: K then V in each (token, head) row; LBNHC / LBHNC memory order
    "vllm-lbnhc": (
        lambda s: {"kv": (s.N, s.B, s.H, 2 * s.D)},
        lambda s, n, b, h, d, layer: (("kv", (n, b, h, d)), ("kv", (n, b, h, s.D + d))),
    ),
    "vllm-lbhnc": (
        lambda s: {"kv": (s.N, s.H, s.B, 2 * s.D)},
        lambda s, n, b, h, d, layer: (("kv", (n, h, b, d)), ("kv", (n, h, b, s.D + d))),
    ),
    "ascend": (
        lambda s: {"k": (s.N, s.B, s.H, s.D), "v": (s.N, s.B, s.H, s.D)},
        lambda s, n, b, h, d, layer: (("k", (n, b, h, d)), ("v", (n, b, h, d))),
    ),
    "ascend-310p": (
        lambda s: {"kv": (2, s.N, s.H * s.D // 16, s.B, 16)},
        lambda s, n, b, h, d, layer: (
            ("kv", (0, n, (h * s.D + d) // 16, b, d % 16)),
            ("kv", (1, n, (h * s.D + d) // 16, b, d % 16)),
        ),
    ),
    "gaudi": (
        lambda s: {"k": (s.N * s.B, s.H, s.D), "v": (s.N * s.B, s.H, s.D)},
        lambda s, n, b, h, d, layer: (("k", (n * s.B + b, h, d)), ("v", (n * s.B + b, h, d))),
    ),
    "sglang": (
        lambda s: {"k": (s.N * s.B, s.H, s.D), "v": (s.N * s.B, s.H, s.D)},
        lambda s, n, b, h, d, layer: (("k", (n * s.B + b, h, d)), ("v", (n * s.B + b, h, d))),
    ),
    "tensorrt-llm": (
        lambda s: {"kv": (s.N, s.L, 2, s.H, s.B, s.D)},
        lambda s, n, b, h, d, layer: (
            ("kv", (n, layer, 0, h, b, d)),
            ("kv", (n, layer, 1, h, b, d)),
        ),
    ),
}

ISSUE_LAYOUTS = set(PUBLISHED)


def sizes_of(desc: KVDescriptor, num_blocks: int, layers: int = 1) -> SimpleNamespace:
    x = 16 if desc.layout == "ascend-310p" else 16 // torch_dtype(desc).itemsize
    return SimpleNamespace(
        N=num_blocks, B=desc.block_size, H=len(desc.heads), D=desc.head_dim, L=layers, x=x
    )


def token_grid(num_tokens: int, heads: int, head_dim: int, block_size: int):
    """Index tensors over every (t, h, d): block, offset, head, dim."""
    t, h, d = torch.meshgrid(
        torch.arange(num_tokens), torch.arange(heads), torch.arange(head_dim), indexing="ij"
    )
    return t // block_size, t % block_size, h, d


def build_payload(
    desc: KVDescriptor, k: torch.Tensor, v: torch.Tensor, layers: int = 1, layer: int = 0
) -> dict[str, torch.Tensor]:
    """Storage in desc's layout, placed by the published formula (zeros elsewhere)."""
    num_blocks = -(-k.shape[0] // desc.block_size)
    s = sizes_of(desc, num_blocks, layers)
    shapes, where = PUBLISHED[desc.layout]
    storage = {
        name: torch.zeros(shape, dtype=torch_dtype(desc)) for name, shape in shapes(s).items()
    }
    n, b, h, d = token_grid(k.shape[0], k.shape[1], k.shape[2], desc.block_size)
    (k_name, k_at), (v_name, v_at) = where(s, n, b, h, d, layer)
    bits(storage[k_name])[k_at] = bits(k)
    bits(storage[v_name])[v_at] = bits(v)
    return storage


def read_payload(
    desc: KVDescriptor, storage: dict[str, torch.Tensor], num_tokens: int, layer: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks = -(-num_tokens // desc.block_size)
    shapes, where = PUBLISHED[desc.layout]
    layers = next(iter(storage.values())).shape[1] if desc.layout == "tensorrt-llm" else 1
    s = sizes_of(desc, num_blocks, layers)
    n, b, h, d = token_grid(num_tokens, s.H, s.D, desc.block_size)
    (k_name, k_at), (v_name, v_at) = where(s, n, b, h, d, layer)
    return storage[k_name][k_at], storage[v_name][v_at]


def exact_values(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Small multiples of 1/2 in `dtype` (the tests compare bits, never recompute)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-16, 16, shape, generator=g) / 2).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


@st.composite
def descriptors(draw: st.DrawFn, layout: str | None = None) -> KVDescriptor:
    name = layout or draw(st.sampled_from(sorted(LAYOUTS)))
    spec = LAYOUTS[name]
    heads = draw(st.sampled_from([1, 2, 4]))
    tp = draw(st.sampled_from([1, 2, 4, 8]))
    return KVDescriptor(
        layout=name,
        block_size=draw(st.sampled_from(spec.block_sizes)),
        dtype=draw(st.sampled_from(spec.dtypes)),
        num_layers=4,
        num_kv_heads=heads,
        head_dim=draw(st.sampled_from([16, 32, 48])),
        tp_size=tp,
        tp_rank=draw(st.integers(0, tp - 1)),
    )


# --- the registry -----------------------------------------------------------------------


def test_registry_holds_every_layout_of_issue_3() -> None:
    assert set(LAYOUTS) == ISSUE_LAYOUTS  # a new layout needs its published formula here
    for spec in LAYOUTS.values():
        assert spec.engine and spec.backend
        assert ".py" in spec.notes or "::" in spec.notes, spec.name  # names its source
        assert set(spec.dtypes) <= set(DTYPES) and "float32" in spec.dtypes
        assert all(b & (b - 1) == 0 for b in spec.block_sizes)


def test_layouts_carry_their_engine_facts() -> None:
    assert get_layout("ascend").block_sizes == (128,)
    assert get_layout("gaudi").reserved_blocks == 1
    assert get_layout("sglang").reserved_blocks == 1
    assert get_layout("tensorrt-llm").multi_layer
    assert not get_layout("vllm-flash").multi_layer
    assert "float8_e4m3fnuz" in get_layout("vllm-triton").dtypes
    assert "float8_e4m3fn" not in get_layout("gaudi").dtypes  # per-token scales: not modelled


def test_unknown_layout_is_named() -> None:
    with pytest.raises(ValueError, match="unknown KV layout 'nope'.*vllm-flash"):
        get_layout("nope")


def test_registering_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register(get_layout("vllm-flash"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": Plane("kv", ("KV", "N", "B", "H"), 0)}, "not N,B,H,D"),
        ({"k": Plane("kv", ("KV", "N", "B", "H", "D"))}, "kv_index"),
        ({"k": Plane("kv", ("N", "B", "H", "D"), 0)}, "kv_index"),
        ({"k": Plane("other", ("KV", "N", "B", "H", "D"), 0)}, "unknown tensor"),
        ({"storage": {"kv": ("KV", "N", "B", "H", "D", "2")}}, "not a view"),
        ({"storage": {"kv": ("KV", "N*N", "B", "H", "D")}}, "one N"),
        ({"storage": {"kv": ("KV", "N", "B", "H", "Q")}}, "known symbols"),
        ({"k": Plane("kv", ("KV", "N", "B", "H", "Dx", "x"), 0)}, "no pack"),
        ({"block_sizes": (16, 48)}, "powers of two"),
        ({"pack_bytes": 16, "pack_elems": 16}, "not both"),
    ],
)
def test_malformed_specs_are_rejected(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(get_layout("vllm-flash"), name="broken", **change)


def test_multi_layer_axis_must_stand_alone() -> None:
    spec = get_layout("tensorrt-llm")
    with pytest.raises(ValueError, match="L must be a dim of its own"):
        replace(spec, storage={"kv": ("N*L", "KV", "H", "B", "D")})


# --- descriptors ------------------------------------------------------------------------


def desc_of(layout: str, **kw: object) -> KVDescriptor:
    spec = get_layout(layout)
    base = {"block_size": spec.block_sizes[0], "dtype": "float32", "num_layers": 4}
    base.update(num_kv_heads=4, head_dim=32)
    base.update(kw)
    return KVDescriptor(layout=layout, **base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"layout": "ascend", "dtype": "float8_e4m3fn"}, "does not store"),
        ({"layout": "ascend", "block_size": 16}, "block size 16"),
        ({"layout": "vllm-flash", "head_dim": 0}, ">= 1"),
        ({"layout": "vllm-flash", "tp_size": 2, "tp_rank": 2}, "tp_rank 2"),
        ({"layout": "vllm-flash", "tp_size": 3}, "cannot be split"),
        ({"layout": "vllm-paged-legacy", "dtype": "float16", "head_dim": 12}, "pack 8"),
        ({"layout": "ascend-310p", "head_dim": 8}, "pack 16"),
        ({"layout": "vllm-flash", "layer_start": 3, "layer_stop": 2}, "layer range"),
        ({"layout": "vllm-flash", "layer_stop": 5}, "layer range"),
    ],
)
def test_bad_descriptors_are_rejected(kw: dict, message: str) -> None:
    layout = kw.pop("layout")
    with pytest.raises(ValueError, match=message):
        desc_of(layout, **kw)


def test_heads_follow_vllm_tensor_parallel_rule() -> None:
    split = [desc_of("vllm-flash", num_kv_heads=4, tp_size=2, tp_rank=r).heads for r in range(2)]
    assert split == [range(0, 2), range(2, 4)]
    replicated = [desc_of("vllm-flash", num_kv_heads=2, tp_size=8, tp_rank=r) for r in range(8)]
    assert [d.heads.start for d in replicated] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(len(d.heads) == 1 for d in replicated)


def test_pack_depends_on_dtype_or_is_fixed() -> None:
    assert desc_of("vllm-paged-legacy", dtype="float32").pack == 4
    assert desc_of("vllm-paged-legacy", dtype="float16").pack == 8
    assert desc_of("vllm-paged-legacy", dtype="float8_e4m3fn").pack == 16
    assert desc_of("ascend-310p", dtype="float32").pack == 16
    assert desc_of("ascend-310p", dtype="float16").pack == 16
    assert desc_of("vllm-flash").pack == 1


def test_descriptor_id_is_stable_and_distinguishes() -> None:
    a, b = desc_of("vllm-flash"), desc_of("vllm-flash")
    assert a.id == b.id and a.same_kv_as(b)
    assert a.id != desc_of("vllm-flash", tp_size=2).id
    assert a.id != desc_of("vllm-flash-hnd").id


# --- views and payloads against the published formulas ----------------------------------


@settings(max_examples=60, deadline=None)
@given(desc=descriptors(), num_tokens=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_payload_matches_published_formula(desc: KVDescriptor, num_tokens: int, seed: int) -> None:
    shape = (num_tokens, len(desc.heads), desc.head_dim)
    k, v = (
        exact_values(shape, torch_dtype(desc), seed),
        exact_values(shape, torch_dtype(desc), seed + 1),
    )
    num_blocks = -(-num_tokens // desc.block_size)
    shapes, _ = PUBLISHED[desc.layout]
    assert desc.storage_shapes(num_blocks) == shapes(sizes_of(desc, num_blocks))
    # formula -> plane_view
    read_k, read_v = payload_to_tokens(desc, build_payload(desc, k, v), num_tokens)
    assert same_bits(read_k, k) and same_bits(read_v, v)
    # plane_view -> formula
    written = payload_from_tokens(desc, k, v)
    got_k, got_v = read_payload(desc, written, num_tokens)
    assert same_bits(got_k, k) and same_bits(got_v, v)
    # bytes round trip
    data = payload_to_bytes(written)
    assert len(data) == desc.payload_nbytes(num_blocks)
    back = payload_from_bytes(desc, data, num_blocks)
    assert all(same_bits(back[name], written[name]) for name in written)
    # a frame's payload buffer: the same bytes, and no copy of a one-tensor payload
    buffer = payload_buffer(written)
    assert bytes(buffer) == data
    if len(written) == 1:
        (tensor,) = written.values()
        assert torch.frombuffer(buffer, dtype=torch.uint8).data_ptr() == tensor.data_ptr()


@pytest.mark.parametrize("layout", sorted(ISSUE_LAYOUTS))
def test_canonical_views_are_views(layout: str) -> None:
    desc = desc_of(layout, block_size=get_layout(layout).block_sizes[-1])
    payload = new_payload(desc, 3)
    k, v = kv_views(desc, payload, 3)
    for view in (k, v):
        if view.dim() == 5:
            n, b, h, dx, x = view.shape
            assert (n, b, h, dx * x) == (3, desc.block_size, 4, 32)
        else:
            assert tuple(view.shape) == (3, desc.block_size, 4, 32)
    k.fill_(1.0)
    v.fill_(2.0)  # writing through the views fills the whole storage, K and V apart
    total = sum(t.sum().item() for t in payload.values())
    assert total == 3 * desc.block_size * 4 * 32 * 3


def test_payload_size_is_checked() -> None:
    desc = desc_of("vllm-flash")
    with pytest.raises(ValueError, match="need"):
        payload_from_bytes(desc, b"\0" * (desc.payload_nbytes(2) - 1), 2)


# --- engine caches: multi-layer blocks, gather and scatter ------------------------------


def test_multi_layer_payload_is_one_layer() -> None:
    desc = desc_of("tensorrt-llm", block_size=16)
    assert desc.storage_shapes(5) == {"kv": (5, 1, 2, 4, 16, 32)}
    assert desc.storage_shapes(5, multi_layer_count=3) == {"kv": (5, 3, 2, 4, 16, 32)}
    assert desc.payload_nbytes(5) == 5 * 2 * 4 * 16 * 32 * 4


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_multi_layer_cache_views_and_gathers_one_layer(layer: int) -> None:
    desc = desc_of("tensorrt-llm", block_size=16, num_layers=3)
    k, v = exact_values((40, 4, 32), torch.float32, 1), exact_values((40, 4, 32), torch.float32, 2)
    cache = build_payload(desc, k, v, layers=3, layer=layer)
    got = payload_to_tokens(desc, cache, 40)  # layer 0 of the cache: empty unless layer == 0
    assert same_bits(got[0], k) == (layer == 0)
    view_k, view_v = kv_views(desc, cache, 3, layer_index=layer)
    assert same_bits(view_k.reshape(48, 4, 32)[:40], k)
    payload = gather_payload(desc, cache, torch.tensor([0, 1, 2]), layer_index=layer)
    assert same_bits(payload_to_tokens(desc, payload, 40)[1], v)
    with pytest.raises(IndexError, match="layer index 3"):
        kv_views(desc, cache, 3, layer_index=3)


@settings(max_examples=40, deadline=None)
@given(desc=descriptors(), seed=st.integers(0, 2**16), data=st.data())
def test_gather_then_scatter_moves_whole_blocks(
    desc: KVDescriptor, seed: int, data: st.DataObject
) -> None:
    total = 6 + desc.spec.reserved_blocks
    layers = 2 if desc.spec.multi_layer else 1
    layer = data.draw(st.integers(0, layers - 1))
    shapes = desc.storage_shapes(total, multi_layer_count=layers)
    cache = {
        name: exact_values(shape, torch_dtype(desc), seed + i)
        for i, (name, shape) in enumerate(shapes.items())
    }
    ids = data.draw(st.lists(st.integers(0, total - 1), min_size=1, max_size=4, unique=True))
    block_ids = torch.tensor(ids)
    payload = gather_payload(desc, cache, block_ids, layer_index=layer)
    assert {n: tuple(t.shape) for n, t in payload.items()} == desc.storage_shapes(len(ids))
    k_all, v_all = kv_views(desc, cache, total, layer_index=layer)
    k_got, v_got = kv_views(desc, payload, len(ids))
    assert torch.equal(bits(k_got), bits(k_all)[block_ids])
    assert torch.equal(bits(v_got), bits(v_all)[block_ids])

    empty = {n: torch.zeros_like(t) for n, t in cache.items()}
    scatter_payload(desc, empty, block_ids, payload, layer_index=layer)
    k_new, v_new = kv_views(desc, empty, total, layer_index=layer)
    assert torch.equal(bits(k_new)[block_ids], bits(k_all)[block_ids])
    assert torch.equal(bits(v_new)[block_ids], bits(v_all)[block_ids])
    others = [i for i in range(total) if i not in ids]
    assert not bits(k_new)[others].any() and not bits(v_new)[others].any()
