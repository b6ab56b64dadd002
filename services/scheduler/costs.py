"""What serving a request on a (prefill, decode, route) would cost, from what instances say
of themselves: pure functions over registry entries, no I/O.

The estimate is a completion time: time to first token (waiting for the prefill instance's
queue, computing the prompt tokens it has not cached), moving the KV the decode instance has
not cached (directly or through the converter), then the expected output tokens at the decode
instance's step time. Speeds are what instances measured of themselves (their heartbeats),
or the planner's figures; an instance that has measured nothing yet is taken to be as fast as
its measured peers (fleet_defaults), and only with no measured peer are the defaults used.

A decode step slows as its batch grows (`decode_batch_growth`: each sequence in the batch adds
that fraction of a one-sequence step), so a request joining a busy decode instance expects a
slower step than one joining an idle instance of the same speed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from proto.kv_descriptor import KVDescriptor
from proto.messages import GenerateRequest, InstanceInfo
from proto.prefix_hash import block_hashes, cached_prefix_blocks, unpack_hashes


@dataclass(frozen=True)
class Defaults:
    """Figures used until an instance has measured its own."""

    prefill_tokens_per_s: float = 2000.0
    decode_step_s: float = 0.02
    kv_bytes_per_s: float = 2.5e8  # one direct KV stream (docs/benchmarks.md: NATS ~0.25 GB/s)
    converter_bytes_per_s: float = 1.2e8  # through the converter: about half
    output_tokens: int = 64  # cap on the output tokens an estimate counts
    handoff_s: float = 0.005  # a hop between instances: the prefill job, the KV stream's end
    # per sequence in the batch, the fraction of a one-sequence decode step it adds; 0.08 is
    # the tiny Llama on 2 CPU cores (scripts/bench_decode_step.py: 3.7 ms at batch 1, 13.4 ms
    # at 32); memory-bound GPU decode grows less
    decode_batch_growth: float = 0.08


@dataclass(frozen=True)
class Estimate:
    ttft_s: float  # to the first token (prefill announces it before its KV has moved)
    transfer_s: float  # then until the decode instance holds the KV
    tpot_s: float
    cached_prefill: int  # prompt tokens the prefill side (or local prefill) need not compute
    cached_decode: int  # prompt tokens the decode side need not receive

    def completion_s(self, output_tokens: int) -> float:
        return self.ttft_s + self.transfer_s + output_tokens * self.tpot_s


class PrefixIndex:
    """Each instance's announced prefix hashes, unpacked once per heartbeat, and a request's
    hashes per block size (instances may use different ones)."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[float, frozenset[int]]] = {}

    def held(self, info: InstanceInfo) -> frozenset[int]:
        seen = self._held.get(info.instance_id)
        if seen is None or seen[0] != info.heartbeat_at:
            try:
                hashes = unpack_hashes(info.cached_prefixes)
            except ValueError:
                hashes = frozenset()
            seen = self._held[info.instance_id] = (info.heartbeat_at, hashes)
        return seen[1]

    def forget(self, live: set[str]) -> None:
        for instance in [i for i in self._held if i not in live]:
            del self._held[instance]


class RequestPrefix:
    """A request's block hashes, computed once per block size."""

    def __init__(self, request: GenerateRequest):
        self.tokens = request.context_token_ids
        self._hashes: dict[int, list[int]] = {}

    def cached_tokens(self, info: InstanceInfo, index: PrefixIndex, align: int = 1) -> int:
        """Leading context tokens `info`'s cache holds, in whole `align`-token runs, never the
        last token (its logits are what prefill computes)."""
        if info.kv is None or not info.cached_prefixes:
            return 0
        size = info.kv.block_size
        if size not in self._hashes:
            self._hashes[size] = block_hashes(self.tokens, size)
        tokens = cached_prefix_blocks(self._hashes[size], index.held(info)) * size
        return min(tokens, len(self.tokens) - 1) // align * align


def kv_bytes_per_token(kv: KVDescriptor) -> int:
    """Bytes of KV one context token takes, over every shard of the instance."""
    return 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * kv.itemsize


def _batch(decode: InstanceInfo) -> int:
    return decode.running + decode.waiting


def single_step_s(decode: InstanceInfo, growth: float) -> float:
    """A decode instance's measured step, brought back to a batch of one (0: not measured).
    Its measurement averages recent steps; its present batch stands for theirs."""
    return decode.decode_step_s / (1 + growth * max(_batch(decode) - 1, 0))


def joining_step_s(decode: InstanceInfo, defaults: Defaults) -> float:
    """The step a request joining `decode`'s batch expects: one sequence more than now."""
    single = single_step_s(decode, defaults.decode_batch_growth) or defaults.decode_step_s
    return single * (1 + defaults.decode_batch_growth * _batch(decode))


def fleet_defaults(
    defaults: Defaults, prefills: list[InstanceInfo], decodes: list[InstanceInfo]
) -> Defaults:
    """The defaults for instances that have not measured themselves: their measured peers'
    median. A fixed guess would make a new instance look much slower or faster than the
    instances beside it, and the estimate would send it nothing or everything."""
    prefill_speeds = [p.prefill_tokens_per_s for p in prefills if p.prefill_tokens_per_s > 0]
    growth = defaults.decode_batch_growth
    steps = [s for d in decodes if (s := single_step_s(d, growth)) > 0]
    return replace(
        defaults,
        prefill_tokens_per_s=statistics.median(prefill_speeds)
        if prefill_speeds
        else defaults.prefill_tokens_per_s,
        decode_step_s=statistics.median(steps) if steps else defaults.decode_step_s,
    )


def prefill_wait_s(prefill: InstanceInfo, defaults: Defaults) -> float:
    speed = prefill.prefill_tokens_per_s or defaults.prefill_tokens_per_s
    return prefill.queued_tokens / speed


def estimate(
    request: GenerateRequest,
    prefix: RequestPrefix,
    index: PrefixIndex,
    prefill: InstanceInfo | None,
    decode: InstanceInfo,
    via_converter: bool,
    defaults: Defaults,
) -> Estimate:
    """`prefill` None: the decode instance prefills it itself (local prefill)."""
    assert decode.kv is not None
    tokens = len(prefix.tokens)
    tpot = joining_step_s(decode, defaults)
    if prefill is None:
        cached = prefix.cached_tokens(decode, index)
        speed = decode.prefill_tokens_per_s or defaults.prefill_tokens_per_s
        # its prompt waits for the queued prompts and for the decode step in progress
        ttft = decode.queued_tokens / speed + (tokens - cached) / speed + tpot / 2
        return Estimate(ttft, 0.0, tpot, cached, cached)
    assert prefill.kv is not None
    align = max(prefill.kv.block_size, decode.kv.block_size)
    cached_p = prefix.cached_tokens(prefill, index)
    cached_d = prefix.cached_tokens(decode, index, align)
    speed = prefill.prefill_tokens_per_s or defaults.prefill_tokens_per_s
    moved = (tokens - cached_d) * kv_bytes_per_token(decode.kv)
    rate = defaults.converter_bytes_per_s if via_converter else defaults.kv_bytes_per_s
    ttft = defaults.handoff_s + prefill_wait_s(prefill, defaults) + (tokens - cached_p) / speed
    return Estimate(ttft, defaults.handoff_s + moved / rate, tpot, cached_p, cached_d)
