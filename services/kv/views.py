"""Canonical views of any layout's storage: K and V as (N, B, H, D), or (N, B, H, Dx, x)
when packed, whatever order and container the engine stores them in.

The same view code serves an engine's whole cache and one frame's payload: a payload is the
storage of one layer restricted to a request's blocks (N = that request's block count, L = 1
for a multi-layer layout).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from proto.kv_descriptor import KVDescriptor
from proto.layout_spec import CANONICAL_DIMS, PACKED_DIMS, Plane


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
