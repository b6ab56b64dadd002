"""The KV blocks of one instance: who holds which, and which hold a known prefix.

Blocks are reference counted: a block a request holds has a count of one per holder, and a
prefix-cached block may be shared by several requests. A block whose count drops to zero is
free; if it held a whole block of tokens it keeps its hash (automatic prefix caching, as
vLLM and nano-vllm do it: proto/prefix_hash.py, each full block hashed with the hash of the
block before it, so a hash names the whole prefix up to it) until the block is handed out
again, least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from proto.kv_descriptor import blocks_for
from proto.prefix_hash import block_hashes


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        reserved: int = 0,
        prefix_caching: bool = False,
    ):
        """`reserved` leading block ids are never handed out (a layout's dummy slot)."""
        if num_blocks <= reserved:
            raise ValueError(
                f"cache of {num_blocks} blocks has none left after {reserved} reserved"
            )
        self.block_size = block_size
        self.num_total = num_blocks - reserved
        self.prefix_caching = prefix_caching
        self._refs: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(reserved, num_blocks))
        self._hash_of: dict[int, int] = {}  # block -> hash of the prefix it completes
        self._block_of: dict[int, int] = {}  # hash -> block
        self.hits = 0  # blocks found cached
        self.queries = 0  # full blocks looked up

    @property
    def num_free(self) -> int:
        """Blocks nobody holds (cached ones included: they are handed out when needed)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a known prefix, held or not."""
        return len(self._block_of)

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def allocate(self, count: int) -> list[int]:
        """`count` blocks for new tokens, taken from the least recently freed."""
        if count > len(self._free):
            raise OutOfBlocks(f"need {count} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            self._forget_hash(block)
            self._refs[block] = 1
            out.append(block)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Let go of one hold on each block; a block nobody holds becomes free."""
        for block in block_ids:
            refs = self._refs.get(block, 0)
            if refs <= 0:
                raise ValueError(f"block {block} freed but not held")
            if refs > 1:
                self._refs[block] = refs - 1
                continue
            del self._refs[block]
            self._free[block] = None

    def match_prefix(
        self, token_ids: Sequence[int], max_blocks: int | None = None, multiple: int = 1
    ) -> list[int]:
        """The cached blocks that hold the longest prefix of `token_ids` (whole blocks, at most
        `max_blocks`, a multiple of `multiple` blocks), each now held once more by the caller.
        Empty without prefix caching."""
        if not self.prefix_caching:
            return []
        found: list[int] = []
        hashes = block_hashes(token_ids, self.block_size, max_blocks)
        self.queries += len(hashes)
        for digest in hashes:
            block = self._block_of.get(digest)
            if block is None:
                break
            found.append(block)
        # a sender whose blocks are `multiple` times larger cannot begin inside one of them
        del found[len(found) // multiple * multiple :]
        for block in found:
            if block in self._free:
                del self._free[block]
            self._refs[block] = self._refs.get(block, 0) + 1
        self.hits += len(found)
        return found

    def cache_prefix(self, block_table: Sequence[int], token_ids: Sequence[int]) -> None:
        """Record the full blocks of `block_table` as holding `token_ids`' prefix (call once
        their KV is written). A block already cached elsewhere for the same prefix stays."""
        if not self.prefix_caching:
            return
        hashes = block_hashes(token_ids, self.block_size, len(block_table))
        for block, digest in zip(block_table, hashes, strict=False):
            if digest in self._block_of or block in self._hash_of:
                continue
            self._hash_of[block] = digest
            self._block_of[digest] = block

    def cached_hashes(self) -> list[int]:
        """Every prefix hash this instance can serve from its cache."""
        return list(self._block_of)

    def _forget_hash(self, block: int) -> None:
        digest = self._hash_of.pop(block, None)
        if digest is not None:
            del self._block_of[digest]
