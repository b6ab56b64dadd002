"""The steps a tensor-parallel leader broadcasts to its followers (pickled, over gloo).

Small on purpose: token ids, block ids, request ids. A decode step carries only the blocks a
request gained since its followers last saw it; each follower keeps the rest (`BlockTables`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from services.engine.engine import PrefillInput


@dataclass(frozen=True)
class PrefillRow:
    """One sequence's chunk of a prefill step."""

    request_id: str
    input: PrefillInput  # its tokens, start and whole block table
    num_tokens: int  # the whole context's length
    extra: Any = None  # whatever the leader's service passes on to the followers' callbacks

    @property
    def completes_prompt(self) -> bool:
        return self.input.stop == self.num_tokens


@dataclass(frozen=True)
class PrefillStep:
    rows: list[PrefillRow]


@dataclass(frozen=True)
class DecodeRow:
    request_id: str
    last_token: int
    num_tokens: int  # including last_token, whose KV this step writes
    new_blocks: list[int]  # appended to the follower's table (the whole table the first time)


@dataclass(frozen=True)
class DecodeStep:
    rows: list[DecodeRow]


@dataclass(frozen=True)
class ShareBlocks:
    """Tell followers a request's blocks before its KV arrives, so they can import into them."""

    request_id: str
    block_table: list[int]


@dataclass(frozen=True)
class ReadyQuery:
    """Which of these requests has each follower's KV complete? (answered with gather_object)"""

    request_ids: list[str]


@dataclass(frozen=True)
class StopStep:
    pass


Step = PrefillStep | DecodeStep | ShareBlocks | ReadyQuery | StopStep


@dataclass(frozen=True)
class Message:
    step: Step
    released: list[str] = field(default_factory=list)  # forget these tables before the step


class BlockTables:
    """A follower's copy of the leader's block tables, readable from any thread."""

    def __init__(self) -> None:
        self._tables: dict[str, list[int]] = {}
        self._changed = threading.Condition()

    def __len__(self) -> int:
        return len(self._tables)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._tables

    def set(self, request_id: str, table: list[int]) -> None:
        with self._changed:
            self._tables[request_id] = list(table)
            self._changed.notify_all()

    def extend(self, request_id: str, blocks: list[int]) -> list[int]:
        """Append to a known table, or start one; returns the table."""
        with self._changed:
            table = self._tables.setdefault(request_id, [])
            table.extend(blocks)
            self._changed.notify_all()
            return table

    def get(self, request_id: str) -> list[int]:
        with self._changed:
            return list(self._tables[request_id])

    def wait(self, request_id: str, timeout: float | None = None) -> list[int]:
        """The table once the leader has shared it; TimeoutError after `timeout` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: request_id in self._tables, timeout):
                raise TimeoutError(f"no block table for request {request_id} in {timeout}s")
            return list(self._tables[request_id])

    def drop(self, request_ids: Iterable[str]) -> None:
        with self._changed:
            for request_id in request_ids:
                self._tables.pop(request_id, None)
