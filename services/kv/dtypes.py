"""The torch dtype behind each dtype name a descriptor carries."""

from __future__ import annotations

import torch

from proto.kv_descriptor import KVDescriptor

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
    "float8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES = frozenset(d for d in DTYPES.values() if d.itemsize == 1)
_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def torch_dtype(desc: KVDescriptor) -> torch.dtype:
    return DTYPES[desc.dtype]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the same width: indexing and equality work for every
    dtype (CPU fp8 lacks index_copy and equal), and NaNs compare by their bits."""
    return tensor.view(_WIDTH[tensor.dtype.itemsize])
