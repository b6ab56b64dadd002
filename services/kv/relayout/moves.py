"""The copies of a plan, as plain numbers over flat byte buffers, and how each one runs."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from services.kv.relayout.casting import Cast, plain

WIDE = {2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}  # bit moves


SHUFFLED = {1: torch.uint8, 4: torch.float32}  # element sizes channel_shuffle moves by SIMD
STRIP, FAR_ROWS = 16, 1024  # strip width in elements, row distance in bytes that needs it


class Strided(NamedTuple):
    """Elements of a flat byte buffer seen as `dtype`: shape, strides and offset in them."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    @classmethod
    def of_view(cls, view: Tensor) -> Strided:
        return cls(view.dtype, tuple(view.shape), view.stride(), view.storage_offset())

    def of(self, flat: Tensor) -> Tensor:
        width = self.dtype.itemsize
        typed = flat[: flat.numel() // width * width].view(self.dtype)
        return typed.as_strided(self.shape, self.stride, self.offset)


class Shuffle(NamedTuple):
    """A copy done as the transpose (P, G, C) -> (P, C, G) of the source by channel_shuffle
    (channels G*C, P pixels, channels last) into a temporary that the target then takes."""

    src: Strided  # the source's dims in (P, G, C) order, elements of the shuffled size
    pixels: int  # P
    groups: int  # G
    dst: Strided  # the target's dims in (P, C, G) order, the same elements


class Move(NamedTuple):
    """One strided copy from a source piece into the target payload being built."""

    shard: int  # index among the shards that supply heads
    piece: int  # index among that shard's pieces, in token order
    plane: int  # 0: K, 1: V (which scale an fp8 cast uses)
    dst: Strided
    src: Strided
    wide: tuple[Strided, Strided] | None = None  # the same bits in wider elements
    shuffle: Shuffle | None = None

    def run(self, buffer: Tensor, flat: Tensor, cast: Cast) -> None:
        if cast is plain and self.wide is not None:
            dst, src = self.wide
            if flat.data_ptr() % src.dtype.itemsize == 0:  # frames need not be aligned
                dst.of(buffer).copy_(src.of(flat))
                return
        if cast is plain and self.shuffle is not None:
            src, pixels, groups, dst = self.shuffle
            tiles = src.of(flat).reshape(1, pixels, 1, -1)  # (P, G*C); a copy if not contiguous
            try:
                shuffled = F.channel_shuffle(tiles.permute(0, 3, 1, 2), groups)  # memory: P, C, G
            except RuntimeError:  # its x86 float kernel needs fbgemm's AVX2: copy_ instead
                pass
            else:
                dst.of(buffer).copy_(shuffled.permute(0, 2, 3, 1).reshape(dst.shape))
                return
        self.dst.of(buffer).copy_(cast(self.src.of(flat)))


class Chunk(NamedTuple):
    """One target payload: its tokens, size, tail slots to zero and the copies that fill it."""

    start: int
    stop: int
    nbytes: int
    zeros: tuple[Strided, ...]
    moves: tuple[Move, ...]
