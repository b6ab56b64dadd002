"""KV cache layouts as data.

A `LayoutSpec` says how one real engine stores a layer's KV: which storage tensors exist
(`storage`, their dims as the engine announces them) and, for K and for V, how that storage
is reinterpreted (`Plane.dims`, same number of elements, so always a view) and which index
of the K/V axis belongs to it. Symbols:

    L layers in one tensor (multi-layer blocks)   N blocks      B tokens per block
    H KV heads of this shard    D head size    Dx = D / x and x = pack factor    KV the K/V axis

A `KVDescriptor` is a layout plus everything concrete: block size, dtype, head count and
head size, tensor-parallel shard, layer range. It travels in frames and registry entries,
so a receiver never guesses how bytes are laid out.

The same view code serves the engine's whole cache and one frame's payload: a payload is
the storage of one layer restricted to a request's blocks (N = that request's block count,
L = 1 for a multi-layer layout).

Every layout lists float32 among its dtypes even where the real engine does not: the native
engine hosts every layout, and on CPU it runs in float32. fp8 entries carry one per-tensor
scale for K and one for V per layer; the scales travel next to the data, not in the bytes.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from pydantic import BaseModel, ConfigDict, model_validator

CANONICAL_DIMS = ("N", "B", "H", "D")
PACKED_DIMS = ("N", "B", "H", "Dx", "x")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES = frozenset(d for d in DTYPES.values() if d.itemsize == 1)

_SYMBOLS = {"L", "N", "B", "H", "D", "Dx", "x", "KV"}


@dataclass(frozen=True)
class Plane:
    """Where K (or V) lives: a reinterpretation of one storage tensor."""

    tensor: str
    dims: tuple[str, ...]
    kv_index: int | None = None  # index on the "KV" axis, when dims has one


@dataclass(frozen=True)
class LayoutSpec:
    name: str
    engine: str
    backend: str
    storage: dict[str, tuple[str, ...]]  # tensor name -> dims; a dim may be a product "B*H*D"
    k: Plane
    v: Plane
    dtypes: tuple[str, ...]
    block_sizes: tuple[int, ...]
    pack_bytes: int | None = None  # x = pack_bytes / element size (vLLM x-packed K)
    pack_elems: int | None = None  # x fixed in elements, whatever the dtype (Ascend NZ)
    reserved_blocks: int = 0  # leading blocks the engine never hands out (slot 0, spare block)
    notes: str = ""

    def __post_init__(self) -> None:
        _check_spec(self)

    @property
    def multi_layer(self) -> bool:
        return any("L" in dim.split("*") for dim in self.storage[self.k.tensor])

    def describe_shape(self) -> str:
        parts = [f"{name}({', '.join(dims)})" for name, dims in self.storage.items()]
        return " + ".join(parts)


def _symbols(dims: tuple[str, ...]) -> list[str]:
    return [s for dim in dims for s in dim.split("*") if not s.isdigit()]


def _check_spec(spec: LayoutSpec) -> None:
    """Reject a malformed layout at registration, not when the first frame arrives."""
    where = f"layout {spec.name}"
    packed = bool(spec.pack_bytes or spec.pack_elems)
    if spec.pack_bytes and spec.pack_elems:
        raise ValueError(f"{where}: give pack_bytes or pack_elems, not both")
    if any(b < 1 or b & (b - 1) for b in spec.block_sizes) or not spec.block_sizes:
        # the converter maps blocks onto blocks by nesting: any two sizes must divide
        raise ValueError(f"{where}: block sizes must be powers of two, got {spec.block_sizes}")
    for name, dims in spec.storage.items():
        symbols = _symbols(dims)
        if set(symbols) - _SYMBOLS or symbols.count("N") != 1:
            raise ValueError(f"{where}: storage {name} {dims} needs known symbols and one N")
        if "L" in symbols and "L" not in dims:
            raise ValueError(f"{where}: L must be a dim of its own in storage {name}")
    probe = Sizes(L=3, N=5, B=7, H=11, D=13 * 16, x=16)
    for label, plane in (("K", spec.k), ("V", spec.v)):
        if plane.tensor not in spec.storage:
            raise ValueError(f"{where}: {label} plane names unknown tensor {plane.tensor!r}")
        if ("KV" in plane.dims) != (plane.kv_index is not None):
            raise ValueError(f"{where}: {label} plane has a KV axis iff it has a kv_index")
        rest = sorted(d for d in plane.dims if d not in ("KV", "L"))
        if rest not in (sorted(CANONICAL_DIMS), sorted(PACKED_DIMS)):
            raise ValueError(f"{where}: {label} plane dims {plane.dims} are not N,B,H,D[x,x]")
        if "x" in rest and not packed:
            raise ValueError(f"{where}: {label} plane is packed but the layout has no pack")
        storage = math.prod(probe.of(d) for d in spec.storage[plane.tensor])
        if math.prod(probe.of(d) for d in plane.dims) != storage:
            raise ValueError(f"{where}: {label} plane {plane.dims} is not a view of its storage")


@dataclass(frozen=True)
class Sizes:
    """Concrete values for the symbols of a layout."""

    L: int
    N: int
    B: int
    H: int
    D: int
    x: int = 1
    KV: int = 2
    extra: dict[str, int] = field(default_factory=dict)

    def of(self, dim: str) -> int:
        total = 1
        for symbol in dim.split("*"):
            if symbol.isdigit():
                total *= int(symbol)
            elif symbol == "Dx":
                total *= self.D // self.x
            else:
                total *= getattr(self, symbol)
        return total


LAYOUTS: dict[str, LayoutSpec] = {}


def register(spec: LayoutSpec) -> LayoutSpec:
    if spec.name in LAYOUTS:
        raise ValueError(f"layout {spec.name!r} registered twice")
    LAYOUTS[spec.name] = spec
    return spec


def get_layout(name: str) -> LayoutSpec:
    try:
        return LAYOUTS[name]
    except KeyError:
        known = ", ".join(sorted(LAYOUTS))
        raise ValueError(f"unknown KV layout {name!r}; known: {known}") from None


class KVDescriptor(BaseModel):
    """A layout made concrete: what one instance (or one TP shard of it) stores."""

    model_config = ConfigDict(frozen=True)

    layout: str
    block_size: int
    dtype: str
    num_layers: int
    num_kv_heads: int  # of the whole model, before sharding
    head_dim: int
    tp_size: int = 1
    tp_rank: int = 0
    layer_start: int = 0
    layer_stop: int | None = None  # None: all layers

    @model_validator(mode="after")
    def _check(self) -> KVDescriptor:
        spec = get_layout(self.layout)
        if self.dtype not in spec.dtypes:
            raise ValueError(
                f"layout {self.layout} does not store {self.dtype}; it accepts {spec.dtypes}"
            )
        if self.block_size not in spec.block_sizes:
            raise ValueError(
                f"layout {self.layout} does not use block size {self.block_size}; "
                f"it accepts {spec.block_sizes}"
            )
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.tp_size) < 1:
            raise ValueError("num_layers, num_kv_heads, head_dim and tp_size must be >= 1")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside tp_size {self.tp_size}")
        big, small = max(self.tp_size, self.num_kv_heads), min(self.tp_size, self.num_kv_heads)
        if big % small:
            raise ValueError(f"{self.num_kv_heads} KV heads cannot be split over tp {self.tp_size}")
        if self.head_dim % self.pack:
            raise ValueError(f"head_dim {self.head_dim} is not a multiple of pack {self.pack}")
        stop = self.num_layers if self.layer_stop is None else self.layer_stop
        if not 0 <= self.layer_start < stop <= self.num_layers:
            raise ValueError(
                f"layer range [{self.layer_start}, {stop}) outside {self.num_layers} layers"
            )
        return self

    @property
    def spec(self) -> LayoutSpec:
        return get_layout(self.layout)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_fp8(self) -> bool:
        return self.torch_dtype in FP8_DTYPES

    @property
    def pack(self) -> int:
        spec = self.spec
        if spec.pack_elems:
            return spec.pack_elems
        if spec.pack_bytes:
            return spec.pack_bytes // self.torch_dtype.itemsize
        return 1

    @property
    def heads(self) -> range:
        """KV heads this shard holds (vLLM QKVParallelLinear: replicate when tp > heads)."""
        if self.tp_size <= self.num_kv_heads:
            per = self.num_kv_heads // self.tp_size
            return range(self.tp_rank * per, (self.tp_rank + 1) * per)
        head = self.tp_rank // (self.tp_size // self.num_kv_heads)
        return range(head, head + 1)

    @property
    def layers(self) -> range:
        stop = self.num_layers if self.layer_stop is None else self.layer_stop
        return range(self.layer_start, stop)

    @property
    def id(self) -> str:
        """Short stable id carried by every frame; equal ids mean identical bytes layout."""
        return hashlib.blake2s(self.model_dump_json().encode(), digest_size=6).hexdigest()

    def sizes(self, num_blocks: int, num_layers: int | None = None) -> Sizes:
        return Sizes(
            L=len(self.layers) if num_layers is None else num_layers,
            N=num_blocks,
            B=self.block_size,
            H=len(self.heads),
            D=self.head_dim,
            x=self.pack,
        )

    def storage_shapes(
        self, num_blocks: int, multi_layer_count: int = 1
    ) -> dict[str, tuple[int, ...]]:
        """Shapes of the storage tensors; with the default count, one layer's (a payload's)."""
        return dict(_storage_shapes(self, num_blocks, multi_layer_count))

    def payload_nbytes(self, num_blocks: int) -> int:
        """Bytes of one layer's KV for `num_blocks` blocks of this shard."""
        shapes = _storage_shapes(self, num_blocks, 1)
        return sum(math.prod(shape) for _, shape in shapes) * self.torch_dtype.itemsize

    def same_kv_as(self, other: KVDescriptor) -> bool:
        """Same layout of the same KV: frames can pass from one to the other untouched."""
        return self.id == other.id


# Shapes are parsed from the symbolic dims once per (descriptor, block count): views are
# taken for every frame and every engine step.
@lru_cache(maxsize=4096)
def _storage_shapes(
    desc: KVDescriptor, num_blocks: int, layers: int
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    sizes = desc.sizes(num_blocks, layers)
    return tuple(
        (name, tuple(sizes.of(dim) for dim in dims)) for name, dims in desc.spec.storage.items()
    )


@lru_cache(maxsize=4096)
def _plane_plan(
    desc: KVDescriptor, plane: Plane, num_blocks: int, layers: int
) -> tuple[tuple[int, ...], tuple[tuple[int, str], ...], tuple[int, ...]]:
    """(view shape, axes to select in order with what selects them, permutation)."""
    sizes = desc.sizes(num_blocks, layers)
    dims = list(plane.dims)
    selects = []
    for axis_name in ("KV", "L"):
        if axis_name in dims:
            selects.append((dims.index(axis_name), axis_name))
            dims.remove(axis_name)
    target = PACKED_DIMS if "x" in dims else CANONICAL_DIMS
    shape = tuple(sizes.of(dim) for dim in plane.dims)
    return shape, tuple(selects), tuple(dims.index(d) for d in target)


def plane_view(
    desc: KVDescriptor,
    plane: Plane,
    storage: dict[str, torch.Tensor],
    num_blocks: int,
    layer_index: int = 0,
) -> torch.Tensor:
    """A view of K or V in canonical dim order: (N, B, H, D), or (N, B, H, Dx, x) if packed.

    `storage` is either an engine cache (for a multi-layer layout holding all its layers)
    or a payload of one layer. `layer_index` selects inside a multi-layer tensor: it counts
    from the tensor's first layer (desc.layer_start), and is 0 for a payload.
    """
    tensor = storage[plane.tensor]
    dims_of_tensor = desc.spec.storage[plane.tensor]
    layers = tensor.shape[dims_of_tensor.index("L")] if "L" in dims_of_tensor else 1
    if not 0 <= layer_index < layers:
        raise IndexError(f"layer index {layer_index} outside the {layers} layer(s) of the tensor")
    shape, selects, permutation = _plane_plan(desc, plane, num_blocks, layers)
    view = tensor.view(shape)
    for axis, what in selects:
        view = view.select(axis, layer_index if what == "L" else plane.kv_index or 0)
    return view.permute(permutation)


def kv_views(
    desc: KVDescriptor, storage: dict[str, torch.Tensor], num_blocks: int, layer_index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = desc.spec
    return (
        plane_view(desc, spec.k, storage, num_blocks, layer_index),
        plane_view(desc, spec.v, storage, num_blocks, layer_index),
    )


def to_tokens(view: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(N, B, H, D[x]) view of a payload -> (T, H, D) tokens (a copy)."""
    n, b, h = view.shape[:3]
    return view.reshape(n * b, h, -1)[:num_tokens]


def new_payload(desc: KVDescriptor, num_blocks: int) -> dict[str, torch.Tensor]:
    shapes = desc.storage_shapes(num_blocks)
    return {name: torch.zeros(shape, dtype=desc.torch_dtype) for name, shape in shapes.items()}


def payload_from_tokens(
    desc: KVDescriptor, k: torch.Tensor, v: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Lay out tokens `k`, `v` (T, H, D) as one layer's payload in `desc`'s layout.

    A plain cast: for fp8 it means a scale of 1 (services/converter/relayout.py scales).
    """
    tokens = k.shape[0]
    num_blocks = -(-tokens // desc.block_size)
    payload = new_payload(desc, num_blocks)
    k_view, v_view = kv_views(desc, payload, num_blocks)
    for view, src in ((k_view, k), (v_view, v)):
        flat = src.to(desc.torch_dtype).reshape(tokens, *view.shape[2:])
        block = torch.arange(tokens) // desc.block_size
        offset = torch.arange(tokens) % desc.block_size
        view[block, offset] = flat
    return payload


def payload_to_tokens(
    desc: KVDescriptor, payload: dict[str, torch.Tensor], num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks = -(-num_tokens // desc.block_size)
    k_view, v_view = kv_views(desc, payload, num_blocks)
    return to_tokens(k_view, num_tokens), to_tokens(v_view, num_tokens)


def payload_to_bytes(payload: dict[str, torch.Tensor]) -> bytes:
    """Storage tensors in the spec's order, contiguous, concatenated (copied off a GPU)."""
    return b"".join(
        t.contiguous().cpu().view(torch.uint8).numpy().tobytes() for t in payload.values()
    )


def payload_buffer(payload: dict[str, torch.Tensor]) -> bytes | memoryview:
    """A frame's payload without copying it again: for a one-tensor layout, a view of the
    tensor's memory (a GPU tensor is copied to host once). Only for a payload nothing writes
    to afterwards, as gather_payload and PagedKVCache.export_blocks return."""
    if len(payload) != 1:
        return payload_to_bytes(payload)
    (tensor,) = payload.values()
    return tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data


def _silence_readonly_warning() -> None:
    """torch warns once per process that a read-only buffer makes a read-only tensor; frames
    are never written through, so spend that one warning here, quietly (once, since
    catch_warnings is not thread-safe)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(b"\0", dtype=torch.uint8)


_silence_readonly_warning()


def readonly_bytes(data: bytes | memoryview) -> torch.Tensor:
    """A view of a frame's bytes as uint8: no copy, never written through."""
    return torch.frombuffer(data, dtype=torch.uint8)


def payload_view(
    desc: KVDescriptor, data: bytes | memoryview, num_blocks: int
) -> dict[str, torch.Tensor]:
    """Like payload_from_bytes, without the copy: read-only views of the frame's bytes."""
    _check_payload_size(desc, data, num_blocks)
    return split_payload(desc, readonly_bytes(data), num_blocks)


def _check_payload_size(desc: KVDescriptor, data: bytes | memoryview, num_blocks: int) -> None:
    expected = desc.payload_nbytes(num_blocks)
    if memoryview(data).nbytes != expected:
        raise ValueError(
            f"payload is {memoryview(data).nbytes} bytes; {num_blocks} blocks of {desc.layout} "
            f"need {expected}"
        )


def payload_from_bytes(
    desc: KVDescriptor, data: bytes | memoryview, num_blocks: int
) -> dict[str, torch.Tensor]:
    """A writable copy of `data` as storage tensors (relayout.py reads frames without copying)."""
    _check_payload_size(desc, data, num_blocks)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return split_payload(desc, flat, num_blocks)


def split_payload(
    desc: KVDescriptor, flat: torch.Tensor, num_blocks: int
) -> dict[str, torch.Tensor]:
    """Views of a flat uint8 tensor of payload_nbytes(num_blocks) as the storage tensors."""
    out: dict[str, torch.Tensor] = {}
    typed = flat.view(desc.torch_dtype)
    start = 0
    for name, shape in _storage_shapes(desc, num_blocks, 1):
        count = math.prod(shape)
        out[name] = typed[start : start + count].view(shape)
        start += count
    return out


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the same width: indexing and equality work for every
    dtype (CPU fp8 lacks index_copy and equal), and NaNs compare by their bits."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.view(width[tensor.dtype.itemsize])


def _block_axes(
    desc: KVDescriptor, name: str, tensor: torch.Tensor
) -> tuple[torch.Tensor, list[str]]:
    """`tensor` (contiguous) with every product dim split, as integer bits; and the symbols."""
    dims = desc.spec.storage[name]
    symbols = [s for dim in dims for s in dim.split("*")]
    layers = tensor.shape[dims.index("L")] if "L" in dims else 1
    one = desc.sizes(1, layers)
    shape = [-1 if s == "N" else one.of(s) for s in symbols]
    return bits(tensor).view(shape), symbols


def gather_payload(
    desc: KVDescriptor,
    cache: dict[str, torch.Tensor],
    block_ids: torch.Tensor,
    layer_index: int = 0,
) -> dict[str, torch.Tensor]:
    """One layer's payload (a copy) of the blocks `block_ids` of an engine cache.

    `cache` holds one layer's storage, or every layer for a multi-layer layout (then
    `layer_index` counts from desc.layer_start).
    """
    out: dict[str, torch.Tensor] = {}
    shapes = desc.storage_shapes(len(block_ids))
    for name, tensor in cache.items():
        view, symbols = _block_axes(desc, name, tensor)
        if "L" in symbols:
            view = view.narrow(symbols.index("L"), layer_index, 1)
        picked = view.index_select(symbols.index("N"), block_ids)
        out[name] = picked.reshape(shapes[name]).view(desc.torch_dtype)
    return out


def scatter_payload(
    desc: KVDescriptor,
    cache: dict[str, torch.Tensor],
    block_ids: torch.Tensor,
    payload: dict[str, torch.Tensor],
    layer_index: int = 0,
) -> None:
    """Write one layer's payload into the blocks `block_ids` of an engine cache, in place."""
    for name, tensor in cache.items():
        view, symbols = _block_axes(desc, name, tensor)
        if "L" in symbols:
            view = view.narrow(symbols.index("L"), layer_index, 1)
        src, _ = _block_axes(desc, name, payload[name].contiguous())
        view.index_copy_(symbols.index("N"), block_ids, src)


# The real engines' layouts register themselves on import (data, one place).
from proto import layout_registry  # noqa: E402, F401
