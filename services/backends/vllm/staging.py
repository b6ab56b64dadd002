"""A paged KV cache in shared memory: where a decode service puts received KV for vLLM.

vLLM's worker (the process that owns the real cache) is not the decode service's process,
so the service stores each incoming frame into this staging cache, laid out exactly as
vLLM's cache (same descriptor), and the connector in the worker copies the staged blocks
into the blocks vLLM allocates, in the step that schedules the request. Both processes map
the same file and carve it into the same tensors; the service then unlinks it, so the memory
goes with the last mapping however the processes end.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from proto.kv_descriptor import KVDescriptor
from services.engine.kv_cache import PagedKVCache, storage_plan
from services.kv.dtypes import torch_dtype

ALIGN = 64


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def staging_nbytes(desc: KVDescriptor, num_blocks: int) -> int:
    item = torch_dtype(desc).itemsize
    return sum(
        _aligned(math.prod(shape) * item)
        for plan in storage_plan(desc, num_blocks)
        for shape in plan.values()
    )


def open_staging(
    path: str | Path, desc: KVDescriptor, num_blocks: int, create: bool = False
) -> PagedKVCache:
    """Map `path` (created, zeroed and sized when `create`) as a PagedKVCache of `desc`."""
    nbytes = staging_nbytes(desc, num_blocks)
    if create:
        with open(path, "wb") as f:
            f.truncate(nbytes)
    elif os.path.getsize(path) != nbytes:
        raise ValueError(
            f"staging {path} has {os.path.getsize(path)} bytes, "
            f"{desc.layout} x {num_blocks} blocks needs {nbytes}"
        )
    flat = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
    offset = 0

    def carve(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nonlocal offset
        count = math.prod(shape) * dtype.itemsize
        tensor = flat[offset : offset + count].view(dtype).view(shape)
        offset += _aligned(count)
        return tensor

    return PagedKVCache(desc, num_blocks, tensor_factory=carve)


def staging_path(instance_id: str, rank: int | str = 0) -> Path:
    """Per process and tensor-parallel rank, in /dev/shm where there is one (RAM, not disk).
    rank="{rank}" gives a template for str.format."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path("/tmp")
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in instance_id)
    return base / f"hetserve-staging-{safe}-{os.getpid()}-rank{rank}.kv"
