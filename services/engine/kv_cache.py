"""The paged KV cache, stored in the layout its descriptor names.

Attention writes and reads through services/kv views, so the cache is used in place in
whichever engine's layout the instance's profile chose; frames export and import whole
blocks of one layer as raw bytes of that layout (services/kv/payload.py's gather/scatter).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from proto.kv_descriptor import KVDescriptor
from services.kv.dtypes import torch_dtype
from services.kv.payload import gather_payload, scatter_payload
from services.kv.views import kv_views

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
        multi_layer = desc.spec.multi_layer
        layers = list(desc.layers)
        self.layer_ids = layers
        self._slot = {layer: i for i, layer in enumerate(layers)}
        dtype = torch_dtype(desc)
        made = [
            {name: self._new_tensor(shape, dtype) for name, shape in plan.items()}
            for plan in storage_plan(desc, num_blocks)
        ]
        self.storage = made * len(layers) if multi_layer else made
        # inside a multi-layer tensor, a layer is selected by its slot; else by its own tensors
        self._index = [i if multi_layer else 0 for i in range(len(layers))]
        self.views = [
            kv_views(desc, store, num_blocks, layer_index=index)
            for store, index in zip(self.storage, self._index, strict=True)
        ]

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

    def read(
        self, layer: int, block_tables: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the first `length` context positions of each [S, W] block table ->
        [S, length, H, D] each. Whole blocks are copied (one index_select per plane), not
        token by token: a decode step reads every context of the batch this way, per layer."""
        s, width = block_tables.shape
        flat = block_tables.reshape(-1)
        out = []
        for view in self.views[self._slot[layer]]:
            blocks = view.index_select(0, flat)  # [S * W, block, H, D...]
            tokens = blocks.reshape(s, width * view.shape[1], view.shape[2], -1)
            out.append(tokens[:, :length])
        return out[0], out[1]

    def _block_index(self, block_ids: list[int]) -> torch.Tensor:
        return torch.tensor(block_ids, dtype=torch.long, device=self.device)

    def export_blocks(self, layer: int, block_ids: list[int]) -> dict[str, torch.Tensor]:
        """One layer's storage restricted to `block_ids`, in order: a frame payload (a copy)."""
        slot = self._slot[layer]
        index = self._block_index(block_ids)
        return gather_payload(self.desc, self.storage[slot], index, self._index[slot])

    def import_blocks(
        self, layer: int, block_ids: list[int], payload: dict[str, torch.Tensor]
    ) -> None:
        """Write one layer's payload into `block_ids`, in place."""
        slot = self._slot[layer]
        index = self._block_index(block_ids)
        scatter_payload(self.desc, self.storage[slot], index, payload, self._index[slot])
