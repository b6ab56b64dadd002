"""`bench kv` part (a): convert_layer throughput for layout pairs against a plain tensor copy.

Each case converts one layer shard (e.g. 8 KV heads x 128 dims x 2048 tokens, as a Llama-8B
layer) from the pieces a prefill would send (frames of whole blocks) with
services/converter/relayout.convert_layer, the converter's code, and clones a flat tensor of
the same number of bytes. The two are timed alternately, best of `repeats` each (as timeit:
interference from other processes only ever adds time), so their ratio compares like with like.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from proto.kv_descriptor import KVDescriptor
from proto.layout_registry import LAYOUTS
from proto.layout_spec import LayoutSpec
from services.kv.relayout import ShardLayer, convert_layer, pieces_for

PREFERRED_BLOCK = 16  # vLLM's default; used wherever a layout accepts it
FRAME_HEADER_ROOM = 1024  # what services/converter/worker.py keeps free for the header


@dataclass(frozen=True)
class ConvertCase:
    source: str
    target: str
    source_dtype: str
    target_dtype: str
    source_block: int
    target_block: int
    source_tp: int
    target_tp: int
    tokens: int

    @property
    def permute_only(self) -> bool:
        """Same dtype, block size and TP: a pure re-layout (the issue's 0.5x target)."""
        return (
            self.source_dtype == self.target_dtype
            and self.source_block == self.target_block
            and self.source_tp == self.target_tp
        )


@dataclass(frozen=True)
class ConvertResult:
    case: ConvertCase
    source_bytes: int
    convert_s: float
    copy_s: float
    frame_bytes: int  # larger than asked when one target block did not fit in a frame

    @property
    def convert_gbps(self) -> float:
        return self.source_bytes / self.convert_s / 1e9

    @property
    def copy_gbps(self) -> float:
        return self.source_bytes / self.copy_s / 1e9

    @property
    def ratio(self) -> float:
        return self.copy_s / self.convert_s

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self.case),
            "permute_only": self.case.permute_only,
            "source_bytes": self.source_bytes,
            "convert_s": self.convert_s,
            "copy_s": self.copy_s,
            "convert_gbps": self.convert_gbps,
            "copy_gbps": self.copy_gbps,
            "ratio_to_copy": self.ratio,
            "frame_bytes": self.frame_bytes,
        }


def default_block(spec: LayoutSpec) -> int:
    return PREFERRED_BLOCK if PREFERRED_BLOCK in spec.block_sizes else min(spec.block_sizes)


def pair_blocks(a: LayoutSpec, b: LayoutSpec) -> tuple[int, int]:
    """A block size both accept (16 if they can, else the largest shared), as a deployment
    would configure them; each its own default when they share none."""
    common = set(a.block_sizes) & set(b.block_sizes)
    if PREFERRED_BLOCK in common:
        return PREFERRED_BLOCK, PREFERRED_BLOCK
    if common:
        return max(common), max(common)
    return default_block(a), default_block(b)


def parse_dtype_pairs(text: str) -> list[tuple[str, str]]:
    """`bfloat16,float32,bfloat16:float32` -> [(bf16, bf16), (f32, f32), (bf16, f32)]."""
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        src, _, dst = item.partition(":")
        pairs.append((src, dst or src))
    if not pairs:
        raise ValueError("no dtypes given")
    return pairs


def plan_cases(
    layouts: Iterable[str],
    dtype_pairs: Iterable[tuple[str, str]],
    tokens: Iterable[int],
    tp: tuple[int, int] = (1, 1),
) -> tuple[list[ConvertCase], list[str]]:
    """Every ordered pair of distinct layouts (identical ones bypass the converter) for every
    dtype pair and token count; and why the pairs left out were left out."""
    names = list(layouts)
    for name in names:
        if name not in LAYOUTS:
            raise ValueError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
    cases, skipped = [], []
    for src_dtype, dst_dtype in dtype_pairs:
        for a in names:
            for b in names:
                if a == b:
                    continue
                spec_a, spec_b = LAYOUTS[a], LAYOUTS[b]
                if src_dtype not in spec_a.dtypes or dst_dtype not in spec_b.dtypes:
                    skipped.append(f"{a} {src_dtype} -> {b} {dst_dtype}: dtype not stored")
                    continue
                block_a, block_b = pair_blocks(spec_a, spec_b)
                for n in tokens:
                    cases.append(
                        ConvertCase(a, b, src_dtype, dst_dtype, block_a, block_b, tp[0], tp[1], n)
                    )
    return cases, skipped


def _descriptor(
    layout: str, dtype: str, block: int, tp: int, rank: int, heads: int, head_dim: int
) -> KVDescriptor:
    return KVDescriptor(
        layout=layout,
        block_size=block,
        dtype=dtype,
        num_layers=1,
        num_kv_heads=heads,
        head_dim=head_dim,
        tp_size=tp,
        tp_rank=rank,
    )


def frame_payload_limit(desc: KVDescriptor, max_frame_bytes: int) -> int:
    """Bytes of the pieces a prefill worker sends: whole blocks, one block short of the frame
    limit (services/prefill/worker.py's blocks_per_frame)."""
    per_block = desc.payload_nbytes(1)
    return max(1, max_frame_bytes // per_block - 1) * per_block


def frame_bytes_for(target: KVDescriptor, max_frame_bytes: int) -> int:
    """`max_frame_bytes`, or enough for one target block and the header: the converter
    refuses a target block larger than a frame (it cannot cut blocks)."""
    return max(max_frame_bytes, target.payload_nbytes(1) + FRAME_HEADER_ROOM)


@dataclass(frozen=True)
class PreparedCase:
    convert: Callable[[], object]  # convert_layer for every target shard, as the converter
    source_bytes: int
    frame_bytes: int


def prepare_case(
    case: ConvertCase, heads: int, head_dim: int, max_frame_bytes: int, seed: int = 0
) -> PreparedCase:
    """One layer's source pieces, as a prefill would send them, and its conversions."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(case.tokens, heads, head_dim, generator=gen)
    v = torch.randn(case.tokens, heads, head_dim, generator=gen)
    sources = []
    for rank in range(case.source_tp):
        desc = _descriptor(
            case.source, case.source_dtype, case.source_block, case.source_tp, rank, heads, head_dim
        )
        pieces = pieces_for(desc, k, v, frame_payload_limit(desc, max_frame_bytes))
        sources.append(ShardLayer(desc, pieces))
    targets = [
        _descriptor(
            case.target, case.target_dtype, case.target_block, case.target_tp, rank, heads, head_dim
        )
        for rank in range(case.target_tp)
    ]
    source_bytes = sum(memoryview(p[2]).nbytes for s in sources for p in s.pieces)
    frame_bytes = frame_bytes_for(targets[0], max_frame_bytes)
    limit = frame_bytes - FRAME_HEADER_ROOM

    def convert() -> object:
        return [convert_layer(sources, t, case.tokens, limit) for t in targets]

    return PreparedCase(convert, source_bytes, frame_bytes)


def best_of(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best time of each function over `repeats` alternating rounds, after one warm-up."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def measure_case(
    case: ConvertCase, heads: int, head_dim: int, max_frame_bytes: int, repeats: int
) -> ConvertResult:
    prepared = prepare_case(case, heads, head_dim, max_frame_bytes)
    flat = torch.empty(prepared.source_bytes, dtype=torch.uint8).random_()
    convert_s, copy_s = best_of([prepared.convert, flat.clone], repeats)
    return ConvertResult(case, prepared.source_bytes, convert_s, copy_s, prepared.frame_bytes)
