"""What the simulator runs and what it reports: pools of instances, the routes requests take
between them, the simulation's settings, and per-request latencies."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from services.planner.perf_model import PerfModel
from services.planner.problem import Role


@dataclass(frozen=True)
class Pool:
    role: Role
    perf: PerfModel
    instances: int


@dataclass(frozen=True)
class Route:
    """A share of requests prefilled on `prefill_pool` and decoded on pools of `decode_gpu`.

    To time one phase alone: with no prefill pool, KV arrives with the request; with no
    decode pool of that type, the request ends when its KV has crossed."""

    prefill_pool: int | None
    decode_gpu: str
    share: float


@dataclass(frozen=True)
class Deployment:
    pools: tuple[Pool, ...]
    routes: tuple[Route, ...]  # empty when every pool is colocated
    link_gbps: Mapping[tuple[str, str], float]


@dataclass(frozen=True)
class Settings:
    requests: int
    seed: int
    warmup_fraction: float
    max_batch: int
    max_prefill_tokens: int
    memory_utilisation: float


def sample_percentile(values: np.ndarray, percentile: float) -> float:
    """A value of the sample (no interpolation, so unfinished requests' inf stays inf)."""
    return float(np.percentile(values, percentile, method="inverted_cdf"))


@dataclass(frozen=True)
class SimResult:
    ttft: np.ndarray  # per measured request, s (inf if it never got its first token)
    tpot: np.ndarray  # per measured request, s (inf if it never finished)
    wait: np.ndarray  # per measured request: arrival to KV memory reserved, s
    busy: dict[str, float]  # role -> mean busy fraction of its instances

    def quantiles(self, percentile: float) -> tuple[float, float]:
        return sample_percentile(self.ttft, percentile), sample_percentile(self.tpot, percentile)

    def attainment(self, ttft_s: float, tpot_s: float) -> float:
        return float(np.mean((self.ttft <= ttft_s) & (self.tpot <= tpot_s)))
