"""Frame payloads: one layer's storage restricted to a request's blocks, as tensors and bytes.

`gather_payload` / `scatter_payload` are the one block gather and scatter, used by the
engine's paged cache, the vLLM connector and the staging cache alike.
"""

from __future__ import annotations

import math
import warnings

import torch

from proto.kv_descriptor import KVDescriptor, storage_shapes
from services.kv.dtypes import bits, torch_dtype
from services.kv.views import kv_views, to_tokens


def new_payload(desc: KVDescriptor, num_blocks: int) -> dict[str, torch.Tensor]:
    shapes = desc.storage_shapes(num_blocks)
    return {name: torch.zeros(shape, dtype=torch_dtype(desc)) for name, shape in shapes.items()}


def payload_from_tokens(
    desc: KVDescriptor, k: torch.Tensor, v: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Lay out tokens `k`, `v` (T, H, D) as one layer's payload in `desc`'s layout.

    A plain cast: for fp8 it means a scale of 1 (services/kv/relayout scales).
    """
    tokens = k.shape[0]
    num_blocks = desc.blocks_for(tokens)
    payload = new_payload(desc, num_blocks)
    k_view, v_view = kv_views(desc, payload, num_blocks)
    for view, src in ((k_view, k), (v_view, v)):
        flat = src.to(torch_dtype(desc)).reshape(tokens, *view.shape[2:])
        block = torch.arange(tokens) // desc.block_size
        offset = torch.arange(tokens) % desc.block_size
        view[block, offset] = flat
    return payload


def payload_to_tokens(
    desc: KVDescriptor, payload: dict[str, torch.Tensor], num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks = desc.blocks_for(num_tokens)
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
    """A writable copy of `data` as storage tensors (relayout reads frames without copying)."""
    _check_payload_size(desc, data, num_blocks)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return split_payload(desc, flat, num_blocks)


def split_payload(
    desc: KVDescriptor, flat: torch.Tensor, num_blocks: int
) -> dict[str, torch.Tensor]:
    """Views of a flat uint8 tensor of payload_nbytes(num_blocks) as the storage tensors."""
    out: dict[str, torch.Tensor] = {}
    typed = flat.view(torch_dtype(desc))
    start = 0
    for name, shape in storage_shapes(desc, num_blocks, 1):
        count = math.prod(shape)
        out[name] = typed[start : start + count].view(shape)
        start += count
    return out


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
        out[name] = picked.reshape(shapes[name]).view(torch_dtype(desc))
    return out


def scatter_payload(
    desc: KVDescriptor,
    cache: dict[str, torch.Tensor],
    block_ids: torch.Tensor,
    payload: dict[str, torch.Tensor],
    layer_index: int = 0,
) -> None:
    """Write one layer's payload into the blocks `block_ids` of an engine cache, in place
    (copied to the cache's device first; on CUDA on the current stream, so later steps are
    queued after the copy)."""
    for name, tensor in cache.items():
        view, symbols = _block_axes(desc, name, tensor)
        if "L" in symbols:
            view = view.narrow(symbols.index("L"), layer_index, 1)
        src, _ = _block_axes(desc, name, payload[name].to(tensor.device).contiguous())
        view.index_copy_(symbols.index("N"), block_ids, src)
