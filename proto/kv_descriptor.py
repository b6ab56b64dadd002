"""What one instance (or one tensor-parallel shard of it) stores: a layout made concrete.

A `KVDescriptor` is a layout plus everything concrete: block size, dtype, head count and
head size, tensor-parallel shard, layer range. It travels in frames and registry entries,
so a receiver never guesses how bytes are laid out. Arithmetic only, no torch: the views
over real memory are services/kv/views.py's.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, model_validator

from proto.layout_registry import get_layout
from proto.layout_spec import DTYPE_SIZES, FP8_DTYPE_NAMES, LayoutSpec, Sizes


def kv_heads_of_rank(num_kv_heads: int, tp_size: int, tp_rank: int) -> range:
    """The KV heads tensor-parallel rank `tp_rank` of `tp_size` holds, as vLLM's
    QKVParallelLinear splits them: evenly, or one replicated head when tp > heads."""
    if tp_size <= num_kv_heads:
        per = num_kv_heads // tp_size
        return range(tp_rank * per, (tp_rank + 1) * per)
    head = tp_rank // (tp_size // num_kv_heads)
    return range(head, head + 1)


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


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
    def itemsize(self) -> int:
        """Bytes per stored element."""
        return DTYPE_SIZES[self.dtype]

    @property
    def is_fp8(self) -> bool:
        return self.dtype in FP8_DTYPE_NAMES

    @property
    def pack(self) -> int:
        spec = self.spec
        if spec.pack_elems:
            return spec.pack_elems
        if spec.pack_bytes:
            return spec.pack_bytes // self.itemsize
        return 1

    @property
    def heads(self) -> range:
        """KV heads this shard holds."""
        return kv_heads_of_rank(self.num_kv_heads, self.tp_size, self.tp_rank)

    @property
    def layers(self) -> range:
        stop = self.num_layers if self.layer_stop is None else self.layer_stop
        return range(self.layer_start, stop)

    @property
    def id(self) -> str:
        """Short stable id carried by every frame; equal ids mean identical bytes layout."""
        return _descriptor_id(self)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks of this descriptor that hold `num_tokens` tokens."""
        return blocks_for(num_tokens, self.block_size)

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
        return dict(storage_shapes(self, num_blocks, multi_layer_count))

    def payload_nbytes(self, num_blocks: int) -> int:
        """Bytes of one layer's KV for `num_blocks` blocks of this shard."""
        shapes = storage_shapes(self, num_blocks, 1)
        return sum(math.prod(shape) for _, shape in shapes) * self.itemsize

    def same_kv_as(self, other: KVDescriptor) -> bool:
        """Same layout of the same KV: frames can pass from one to the other untouched."""
        return self.id == other.id


@lru_cache(maxsize=4096)
def _descriptor_id(desc: KVDescriptor) -> str:
    return hashlib.blake2s(desc.model_dump_json().encode(), digest_size=6).hexdigest()


# Shapes are parsed from the symbolic dims once per (descriptor, block count): views are
# taken for every frame and every engine step.
@lru_cache(maxsize=4096)
def storage_shapes(
    desc: KVDescriptor, num_blocks: int, layers: int
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(tensor name, shape) of each storage tensor, in the spec's order."""
    sizes = desc.sizes(num_blocks, layers)
    return tuple(
        (name, tuple(sizes.of(dim) for dim in dims)) for name, dims in desc.spec.storage.items()
    )
