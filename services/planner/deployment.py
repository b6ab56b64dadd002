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
    """A share of requests prefilled on `prefill_pool` and decoded on pools of `decode_gpu`,
    or (`colocated`) served whole by the colocated instances, which share them by shortest
    queue.

    To time one phase alone: with no prefill pool, KV arrives with the request; with no
    decode pool of that type, the request ends when its KV has crossed."""

    prefill_pool: int | None
    decode_gpu: str
    share: float
    colocated: bool = False

    @classmethod
    def to_colocated(cls, share: float) -> Route:
        return cls(None, "", share, colocated=True)


@dataclass(frozen=True)
class Deployment:
    pools: tuple[Pool, ...]
    routes: tuple[Route, ...]  # empty when every pool is colocated (all go there)
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


def allowed_misses(count: int, percentile: float) -> int:
    """How many of `count` values may exceed a target while `sample_percentile` stays within
    it: the percentile is the k-th smallest value, so count - k may lie above."""
    return count - 1 - int(sample_percentile(np.arange(count, dtype=float), percentile))


@dataclass(frozen=True)
class StopRule:
    """Stop a simulation once its verdict is known to be a miss: more than `ttft_misses` (or
    `tpot_misses`) of the measured requests, those from index `first_measured` on, over
    their target. Requests left unfinished count as misses, so the shortened result fails
    the same checks the full one would."""

    first_measured: int
    ttft_s: float
    tpot_s: float
    ttft_misses: float = float("inf")
    tpot_misses: float = float("inf")


@dataclass(frozen=True)
class SimResult:
    ttft: np.ndarray  # per measured request, s (inf if it never got its first token)
    tpot: np.ndarray  # per measured request, s (inf if it never finished)
    wait: np.ndarray  # per measured request: arrival to KV memory reserved, s
    busy: dict[str, float]  # role -> mean busy fraction of its instances
    colocated: np.ndarray | None = None  # per measured request: served by a colocated instance
    stopped_early: bool = False  # a StopRule ended it: the result is a miss, not a measure

    def served_colocated(self) -> np.ndarray:
        if self.colocated is None:
            return np.zeros(len(self.ttft), dtype=bool)
        return self.colocated

    def subset(self, mask: np.ndarray) -> SimResult:
        """The requests where `mask` holds (busy shares stay the whole deployment's)."""
        return SimResult(
            self.ttft[mask], self.tpot[mask], self.wait[mask], self.busy, None, self.stopped_early
        )

    def quantiles(self, percentile: float) -> tuple[float, float]:
        return sample_percentile(self.ttft, percentile), sample_percentile(self.tpot, percentile)

    def attainment(self, ttft_s: float, tpot_s: float) -> float:
        return float(np.mean((self.ttft <= ttft_s) & (self.tpot <= tpot_s)))
