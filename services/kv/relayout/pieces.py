"""Pieces of one layer and the checks on them.

A "piece" is a data frame's content: (token_start, token_stop, payload), the payload holding
ceil((stop - start) / block_size) whole blocks of one layer of one TP shard, in the source
layout."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

from proto.kv_descriptor import KVDescriptor

Piece = tuple[int, int, bytes | memoryview]


OutPiece = tuple[int, int, memoryview]


KVScales = tuple[float, float]  # K scale, V scale; used only by fp8 dtypes


UNIT_SCALES: KVScales = (1.0, 1.0)


class ShardLayer(NamedTuple):
    """Every piece of one layer from one source TP shard, with that shard's fp8 scales."""

    desc: KVDescriptor
    pieces: Sequence[Piece]
    scales: KVScales = UNIT_SCALES


def check_convertible(source: KVDescriptor, target: KVDescriptor) -> None:
    """Both descriptors describe the same model's KV (geometry, not layout or sharding)."""
    for name in ("num_layers", "num_kv_heads", "head_dim"):
        a, b = getattr(source, name), getattr(target, name)
        if a != b:
            raise ValueError(f"cannot convert: source has {name}={a}, target {name}={b}")


def assign_heads(sources: Sequence[KVDescriptor], heads: range) -> list[tuple[int, range]]:
    """Which source shard supplies which of `heads`: (index in sources, contiguous heads).

    The first shard listed that holds a head supplies it; other replicas are not needed (a
    converter need not wait for their frames). Raises if some head has no source.
    """
    owner: dict[int, int] = {}
    for i, desc in enumerate(sources):
        for h in desc.heads:
            owner.setdefault(h, i)
    missing = [h for h in heads if h not in owner]
    if missing:
        raise ValueError(f"no source shard holds KV head(s) {missing}")
    groups: list[tuple[int, range]] = []
    for h in heads:
        if groups and groups[-1][0] == owner[h] and groups[-1][1].stop == h:
            groups[-1] = (owner[h], range(groups[-1][1].start, h + 1))
        else:
            groups.append((owner[h], range(h, h + 1)))
    return groups


def sorted_pieces(
    desc: KVDescriptor, pieces: Sequence[Piece], num_tokens: int, first: int = 0
) -> list[Piece]:
    """The pieces in token order, checked to tile [first, num_tokens) with whole blocks."""
    if num_tokens < 1:
        raise ValueError(f"a layer has at least one token, not {num_tokens}")
    if not 0 <= first < num_tokens:
        raise ValueError(f"the pieces start at token {first}, outside [0, {num_tokens})")
    ordered, covered = sorted(pieces, key=lambda p: (p[0], p[1])), first
    who = f"shard {desc.tp_rank} of {desc.layout}"
    for start, stop, data in ordered:
        if start > covered:
            raise ValueError(f"{who}: tokens [{covered}, {start}) are missing")
        if start < covered:
            raise ValueError(f"{who}: piece [{start}, {stop}) overlaps tokens before {covered}")
        if not start < stop <= num_tokens:
            raise ValueError(f"{who}: piece [{start}, {stop}) outside [{first}, {num_tokens})")
        if start % desc.block_size:
            raise ValueError(f"{who}: piece starts at {start}, inside a block of {desc.block_size}")
        blocks = desc.blocks_for(stop - start)
        size, expected = memoryview(data).nbytes, desc.payload_nbytes(blocks)
        if size != expected:
            raise ValueError(
                f"{who}: piece [{start}, {stop}) is {size} bytes; {blocks} block(s) are {expected}"
            )
        covered = stop
    if covered != num_tokens:
        raise ValueError(f"{who}: tokens [{covered}, {num_tokens}) are missing")
    return ordered


def chunk_ranges(
    desc: KVDescriptor, num_tokens: int, max_payload_bytes: int, first: int = 0
) -> Iterator[tuple[int, int]]:
    """Token ranges of whole blocks, at most `max_payload_bytes` each, over [first, num_tokens)."""
    per_block = desc.payload_nbytes(1)
    if per_block > max_payload_bytes:
        raise ValueError(
            f"one block of {desc.layout} shard {desc.tp_rank} is {per_block} bytes, "
            f"over the payload limit of {max_payload_bytes}"
        )
    step = max_payload_bytes // per_block * desc.block_size
    if first % desc.block_size:
        raise ValueError(f"tokens start at {first}, inside a block of {desc.block_size}")
    for start in range(first, num_tokens, step):
        yield start, min(start + step, num_tokens)
