"""What the prefill and decode services need from an engine, whichever it is."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from proto.kv_descriptor import KVDescriptor
from proto.messages import GenerateRequest, PrefillJob
from services.common.bus import Bus
from services.engine.kv_cache import PagedKVCache
from services.engine.sequence import Sequence


class Spawn(Protocol):
    """The service's Service.spawn: `essential` work ending in an error stops the service."""

    def __call__(
        self, coro: Coroutine[Any, Any, Any], name: str = "", essential: bool = False
    ) -> Any: ...


Announce = Callable[[Sequence], Awaitable[None]]


@dataclass
class Load:
    """What a backend's heartbeat says about it."""

    running: int = 0
    waiting: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    peak_running: int = 0  # largest decode batch so far
    preemptions: int = 0  # sequences given back for lack of KV blocks
    kv_loaded_tokens: int = 0  # prompt tokens decode took from transferred KV
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    cached_prefixes: list[int] = field(default_factory=list)  # prefix hashes it holds
    queued_tokens: int = 0  # prompt tokens it has yet to prefill
    prefill_tokens_per_s: float = 0.0  # measured (0: not yet)
    decode_step_s: float = 0.0


class PrefillBackend(Protocol):
    engine_name: str
    kv: KVDescriptor  # rank 0's: what the instance announces
    max_model_len: int
    device: str  # where rank 0's model runs (cpu, cuda:0, ...)

    async def start(self, bus: Bus, spawn: Spawn) -> None:
        """Load the model and be ready to take jobs."""
        ...

    def load(self) -> Load: ...

    async def prefill(self, job: PrefillJob, announce: Announce) -> None:
        """Compute the job's prompt and stream every rank's KV to `job.route`. `announce(seq)`
        as soon as the first token is sampled (seq.output_ids[-1]); return once every stream
        has ended. On failure the streams end with the error and the error is raised."""
        ...

    async def stop(self) -> None: ...


class DecodeEvents(Protocol):
    """How a decode backend tells its service what became of a sequence."""

    async def tokens(self, seq: Sequence) -> None:
        """`seq` has a new last token; if it finished, the backend has let it go."""
        ...

    async def preempted(self, seq: Sequence) -> None:
        """Out of KV blocks: `seq` gave its blocks back and must be resumed elsewhere."""
        ...

    async def failed(self, seq: Sequence, reason: str) -> None: ...


class DecodeBackend(Protocol):
    engine_name: str
    kv: KVDescriptor  # rank 0's: what the instance announces
    max_model_len: int
    device: str  # where rank 0's model runs (cpu, cuda:0, ...)
    vocab_size: int
    # The ranks whose KV frames this process takes, and the cache each rank's go into.
    local_caches: dict[int, PagedKVCache]

    async def start(self, bus: Bus, spawn: Spawn, events: DecodeEvents) -> None: ...

    def load(self) -> Load: ...

    def blocks_to_hold(self, request: GenerateRequest, num_tokens: int) -> int:
        """Blocks a reservation holds for a request of `num_tokens` (context + output)."""
        ...

    async def reserve(
        self, request: GenerateRequest, count: int, align: int
    ) -> tuple[list[int], int]:
        """Hold `count` blocks on every rank for `request` (raises OutOfBlocks): the blocks,
        and how many leading context tokens they hold already (a cached prefix, a multiple
        of `align` tokens)."""
        ...

    def release(self, request_id: str, blocks: list[int]) -> None:
        """A reservation that will not run: its blocks go back."""
        ...

    def new_sequence(self, request: GenerateRequest) -> Sequence: ...

    async def start_sequence(self, seq: Sequence, deadline: float) -> None:
        """`seq`'s context KV is in its blocks on this process's ranks (seq.block_table) and
        its first token appended: decode it. Ranks elsewhere must be ready by `deadline`
        (time.monotonic) or the sequence fails."""
        ...

    async def start_local(self, seq: Sequence) -> None:
        """Prefill `seq` here (its blocks held, seq.num_computed of its context cached), then
        decode it: conditional disaggregation. Its first token is reported like the others."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop decoding it (between steps) and free its blocks; no event follows."""
        ...

    async def stop(self) -> list[Sequence]:
        """Stop; returns the sequences that were still decoding."""
        ...
