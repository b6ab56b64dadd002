"""The paged KV cache, stored in the layout its descriptor names, and its block allocator.

Attention writes and reads through `proto.layouts` views, so the cache is used in place in
whichever engine's layout the instance's profile chose; frames export and import whole
blocks of one layer as raw bytes of that layout.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from proto.layouts import KVDescriptor, kv_views


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, reserved: int = 0):
        if num_blocks <= reserved:
            raise ValueError(
                f"cache of {num_blocks} blocks has none left after {reserved} reserved"
            )
        self.num_total = num_blocks - reserved
        self._free: deque[int] = deque(range(reserved, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"need {count} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


def _split_symbols(dims: tuple[str, ...]) -> list[str]:
    return [symbol for dim in dims for symbol in dim.split("*")]


TensorFactory = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def storage_plan(desc: KVDescriptor, num_blocks: int) -> list[dict[str, tuple[int, ...]]]:
    """The storage tensors a PagedKVCache of `desc` holds, in the order it creates them: one
    set for all layers (a multi-layer layout), else one set per layer."""
    if desc.spec.multi_layer:
        return [desc.storage_shapes(num_blocks, len(desc.layers))]
    return [desc.storage_shapes(num_blocks, 1) for _ in desc.layers]


class PagedKVCache:
    def __init__(
        self,
        desc: KVDescriptor,
        num_blocks: int,
        device: torch.device | str = "cpu",
        tensor_factory: TensorFactory | None = None,
    ):
        """`tensor_factory(shape, dtype)` supplies the (zeroed) storage tensors, in a fixed
        order: layer by layer, then by storage name; default: torch.zeros on `device`."""
        self.desc = desc
        self._new_tensor = tensor_factory or (
            lambda shape, dtype: torch.zeros(shape, dtype=dtype, device=device)
        )
        self.num_blocks = num_blocks
        spec = desc.spec
        layers = list(desc.layers)
        self.layer_ids = layers
        self._slot = {layer: i for i, layer in enumerate(layers)}
        made = [
            {name: self._new_tensor(shape, desc.torch_dtype) for name, shape in plan.items()}
            for plan in storage_plan(desc, num_blocks)
        ]
        self.storage = made * len(layers) if spec.multi_layer else made
        self.views = [
            kv_views(desc, store, num_blocks, layer_index=i if spec.multi_layer else 0)
            for i, store in enumerate(self.storage)
        ]
        # Each storage tensor with every product dim split, so blocks (N) and layers (L)
        # are axes of their own: exporting blocks is then one index_select.
        self._split = [
            {
                name: tensor.view(tuple(desc.sizes(num_blocks, len(layers)).of(s) for s in symbols))
                for name, tensor in store.items()
                for symbols in [_split_symbols(spec.storage[name])]
            }
            for store in self.storage
        ]
        self._symbols = {name: _split_symbols(dims) for name, dims in spec.storage.items()}

    @property
    def device(self) -> torch.device:
        return next(iter(self.storage[0].values())).device

    def write(
        self,
        layer: int,
        blocks: torch.Tensor,
        offsets: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Store new tokens' K/V ([T, H, D]) at (block, offset) slots."""
        k_view, v_view = self.views[self._slot[layer]]
        for view, values in ((k_view, k), (v_view, v)):
            view[blocks, offsets] = values.to(view.dtype).reshape(values.shape[0], *view.shape[2:])

    def gather(
        self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V at [S, Tmax] slots -> [S, Tmax, H, D] each."""
        k_view, v_view = self.views[self._slot[layer]]
        s, t = blocks.shape
        return (
            k_view[blocks, offsets].reshape(s, t, k_view.shape[2], -1),
            v_view[blocks, offsets].reshape(s, t, v_view.shape[2], -1),
        )

    def export_blocks(self, layer: int, block_ids: list[int]) -> dict[str, torch.Tensor]:
        """One layer's storage restricted to `block_ids`, in order: a frame payload."""
        slot = self._slot[layer]
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        out = {}
        for name, tensor in self._split[slot].items():
            symbols = self._symbols[name]
            if "L" in symbols:
                tensor = tensor.select(symbols.index("L"), slot)
                symbols = [s for s in symbols if s != "L"]
            out[name] = tensor.index_select(symbols.index("N"), index)
        return out

    def import_blocks(
        self, layer: int, block_ids: list[int], payload: dict[str, torch.Tensor]
    ) -> None:
        slot = self._slot[layer]
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for name, tensor in self._split[slot].items():
            symbols = self._symbols[name]
            if "L" in symbols:
                tensor = tensor.select(symbols.index("L"), slot)
                symbols = [s for s in symbols if s != "L"]
            axis = symbols.index("N")
            source = payload[name].to(tensor.device)
            shape = list(tensor.shape)
            shape[axis] = len(block_ids)
            tensor.index_copy_(axis, index, source.reshape(shape))
