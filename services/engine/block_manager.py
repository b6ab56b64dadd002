"""KV blocks of one instance: which are free."""

from __future__ import annotations

from collections import deque


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, reserved: int = 0):
        if num_blocks <= reserved:
            raise ValueError(
                f"cache of {num_blocks} blocks has none left after {reserved} reserved"
            )
        self.num_total = num_blocks - reserved
        self._free: deque[int] = deque(range(reserved, num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"need {count} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
