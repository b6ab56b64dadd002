"""The run as a plain text table or a JSON object (NaN, for metrics with no samples, as null)."""

from __future__ import annotations

import json
import math
from typing import Any

from services.bench.serve import BenchRun
from services.bench.stats import LatencyStats

_WIDTH = 52


def _row(label: str, value: Any) -> str:
    if isinstance(value, float):
        value = "n/a" if math.isnan(value) else f"{value:.2f}"
    return f"{label:<36}{value:>16}"


def _latency_rows(name: str, stats: LatencyStats) -> list[str]:
    return [
        f"{'--- ' + name + ' (ms) ':-<{_WIDTH}}",
        _row(f"Mean {name} (ms):", stats.mean),
        _row(f"P50 {name} (ms):", stats.p50),
        _row(f"P90 {name} (ms):", stats.p90),
        _row(f"P99 {name} (ms):", stats.p99),
    ]


def format_table(run: BenchRun) -> str:
    s, c = run.summary, run.config
    load = f"rate {c.rate:g}/s (Poisson)" if c.rate is not None else f"concurrency {c.concurrency}"
    lines = [
        f"{' Serving benchmark ':=^{_WIDTH}}",
        _row("Model:", run.model),
        _row("Endpoint:", c.endpoint),
        _row("Load:", load),
        *(
            [_row("Turns, shared prefix:", f"{c.turns}, {c.shared_prefix}")]
            if c.conversational
            else []
        ),
        _row("Successful requests:", s.requests_ok),
        _row("Shed requests (429/503):", s.requests_shed),
        _row("Failed requests:", s.requests_failed),
        _row("Duration (s):", s.duration_s),
        _row("Prompt tokens:", s.prompt_tokens),
        _row("Prompt tokens from a prefix cache:", s.cached_tokens),
        _row("Output tokens:", s.output_tokens),
        _row("Request throughput (req/s):", s.request_throughput),
        _row("Output token throughput (tok/s):", s.output_token_throughput),
        _row("Total token throughput (tok/s):", s.total_token_throughput),
        *_latency_rows("TTFT", s.ttft),
        *_latency_rows("TPOT", s.tpot),
        *_latency_rows("ITL", s.itl),
        *_latency_rows("E2E", s.e2e),
        *(_latency_rows("Shed answer", s.shed_latency) if s.requests_shed else []),
        "=" * _WIDTH,
    ]
    if not s.exact_token_counts and s.requests_ok:
        lines.append("note: no token_ids in the stream; ITL counts each chunk as one token")
    for message, count in s.errors.items():
        lines.append(f"error x{count}: {message}")
    return "\n".join(lines)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def to_json(run: BenchRun) -> str:
    return json.dumps(_nan_to_none(run.to_dict()), indent=2, allow_nan=False)
