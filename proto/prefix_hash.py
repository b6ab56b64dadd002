"""Names of KV prefixes: the chained hash of every full block of token ids.

A block's hash covers its tokens and the hash of the block before it, so one hash names the
whole prefix up to its block (vLLM's automatic prefix caching, nano-vllm's too). Instances
announce the hashes they hold and the scheduler hashes a request's tokens the same way, so
both sides must use this one function. Pure Python: the scheduler never loads numpy or torch.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash


def block_hashes(token_ids: Sequence[int], block_size: int, count: int | None = None) -> list[int]:
    """Chained hashes of the first `count` (default: every) full blocks of `token_ids`."""
    full = len(token_ids) // block_size
    count = full if count is None else max(0, min(count, full))
    packer = struct.Struct(f"<{block_size}q")
    out: list[int] = []
    parent = 0
    for i in range(count):
        digest = xxhash.xxh3_64(parent.to_bytes(8, "little"))
        digest.update(packer.pack(*token_ids[i * block_size : (i + 1) * block_size]))
        parent = digest.intdigest()
        out.append(parent)
    return out


def pack_hashes(hashes: Sequence[int]) -> bytes:
    """Hashes as little-endian uint64s: 8 bytes each in a heartbeat."""
    return struct.pack(f"<{len(hashes)}Q", *hashes)


def unpack_hashes(data: bytes) -> frozenset[int]:
    if len(data) % 8:
        raise ValueError(f"packed prefix hashes of {len(data)} bytes (not a multiple of 8)")
    return frozenset(struct.unpack(f"<{len(data) // 8}Q", data))


def cached_prefix_blocks(hashes: Sequence[int], held: frozenset[int]) -> int:
    """How many leading blocks of a request (its `hashes`) an instance holding `held` has."""
    count = 0
    for digest in hashes:
        if digest not in held:
            break
        count += 1
    return count
