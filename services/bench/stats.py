"""Percentiles and the summary of a run.

Percentiles interpolate linearly between the two nearest ranks (numpy's default method), so
p50 of [1, 2, 3, 4] is 2.5.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from services.bench.client import RequestResult

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) of values, linear between ranks; nan when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> LatencyStats:
        ms = [v * 1000 for v in values]
        mean = sum(ms) / len(ms) if ms else math.nan
        p50, p90, p99 = (percentile(ms, q) for q in PERCENTILES)
        return cls(len(ms), mean, p50, p90, p99)


@dataclass(frozen=True)
class RunSummary:
    requests_ok: int
    requests_failed: int  # no answer, or an error answer that is not a shed
    duration_s: float
    request_throughput: float  # ok requests per second
    output_token_throughput: float  # tokens per second
    total_token_throughput: float  # prompt + output tokens per second
    prompt_tokens: int
    output_tokens: int
    exact_token_counts: bool  # every ok request's chunks carried token_ids
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    errors: dict[str, int]  # message -> count (shed answers included)
    # Refused for load (429, or 503 with Retry-After) and how fast the refusal came
    requests_shed: int = 0
    shed_latency: LatencyStats = LatencyStats(0, math.nan, math.nan, math.nan, math.nan)
    cached_tokens: int = 0  # prompt tokens the server says a prefix cache served

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: Sequence[RequestResult], duration_s: float) -> RunSummary:
    ok = [r for r in results if r.ok]
    shed = [r for r in results if r.shed]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    per_s = 1 / duration_s if duration_s > 0 else math.nan
    tpots = [t for r in ok if (t := r.tpot) is not None]
    return RunSummary(
        requests_ok=len(ok),
        requests_failed=len(results) - len(ok) - len(shed),
        duration_s=duration_s,
        request_throughput=len(ok) * per_s,
        output_token_throughput=output_tokens * per_s,
        total_token_throughput=(prompt_tokens + output_tokens) * per_s,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        exact_token_counts=bool(ok) and all(r.exact_token_counts for r in ok),
        ttft=LatencyStats.of_seconds([r.ttft for r in ok if r.ttft is not None]),
        tpot=LatencyStats.of_seconds(tpots),
        itl=LatencyStats.of_seconds([gap for r in ok for gap in r.itl]),
        e2e=LatencyStats.of_seconds([r.e2e for r in ok if r.e2e is not None]),
        errors=dict(Counter(r.error for r in results if r.error is not None).most_common()),
        requests_shed=len(shed),
        shed_latency=LatencyStats.of_seconds([r.latency for r in shed if r.latency is not None]),
        cached_tokens=sum(r.cached_tokens or 0 for r in ok),
    )
