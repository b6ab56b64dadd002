"""Dtype casts between KV encodings: a plain cast between float dtypes; fp8 values are
real = stored * scale, with one per-tensor scale for K and one for V (vLLM's _k_scale/_v_scale),
saturating on overflow."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from services.kv.dtypes import FP8_DTYPES
from services.kv.relayout.pieces import KVScales


def cast_kv(x: Tensor, dtype: torch.dtype, scale_in: float = 1.0, scale_out: float = 1.0) -> Tensor:
    """The values `x` (times `scale_in` if `x` is fp8) in `dtype` (divided by `scale_out` and
    clamped to its range if fp8). Without fp8 on either side, a plain `.to(dtype)`."""
    if x.dtype not in FP8_DTYPES and dtype not in FP8_DTYPES:
        return x.to(dtype)
    y = x.to(torch.float32)
    if x.dtype in FP8_DTYPES and scale_in != 1.0:
        y = y * scale_in
    if dtype in FP8_DTYPES:
        if scale_out != 1.0:
            y = y / scale_out
        limit = torch.finfo(dtype).max  # torch turns overflow into NaN for the fnuz types
        y = y.clamp(-limit, limit)
    return y.to(dtype)


Cast = Callable[[Tensor], Tensor]


def plain(x: Tensor) -> Tensor:
    return x  # copy_ casts between float dtypes itself


def casters(
    src: torch.dtype, src_scales: KVScales, dst: torch.dtype, dst_scales: KVScales
) -> tuple[Cast, Cast]:
    if src not in FP8_DTYPES and dst not in FP8_DTYPES:
        return plain, plain
    if src == dst and src_scales == dst_scales:
        return plain, plain  # same fp8 encoding: move the bits
    (k_in, v_in), (k_out, v_out) = src_scales, dst_scales
    return (
        partial(cast_kv, dtype=dst, scale_in=k_in, scale_out=k_out),
        partial(cast_kv, dtype=dst, scale_in=v_in, scale_out=v_out),
    )
