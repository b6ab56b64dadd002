"""KV cache layouts as data: the schema of a layout and its symbolic dims. No torch.

A `LayoutSpec` says how one real engine stores a layer's KV: which storage tensors exist
(`storage`, their dims as the engine announces them) and, for K and for V, how that storage
is reinterpreted (`Plane.dims`, same number of elements, so always a view) and which index
of the K/V axis belongs to it. Symbols:

    L layers in one tensor (multi-layer blocks)   N blocks      B tokens per block
    H KV heads of this shard    D head size    Dx = D / x and x = pack factor    KV the K/V axis

Every layout lists float32 among its dtypes even where the real engine does not: the native
engine hosts every layout, and on CPU it runs in float32. fp8 entries carry one per-tensor
scale for K and one for V per layer; the scales travel next to the data, not in the bytes.
The registered layouts are in proto/layout_registry.py; the tensor views that read them in
services/kv/views.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

CANONICAL_DIMS = ("N", "B", "H", "D")
PACKED_DIMS = ("N", "B", "H", "Dx", "x")

# Every KV dtype a layout may name, with its element size in bytes (the torch dtypes are
# services/kv/dtypes.py's: the contract itself carries only names).
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
}
FP8_DTYPE_NAMES = frozenset(name for name, size in DTYPE_SIZES.items() if size == 1)

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
    unknown = [d for d in spec.dtypes if d not in DTYPE_SIZES]
    if unknown:
        raise ValueError(f"{where}: unknown dtypes {unknown}; known: {sorted(DTYPE_SIZES)}")
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
