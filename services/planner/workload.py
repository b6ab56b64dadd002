"""Request lengths and arrival rate, resolved from the spec's workload section."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.stats import norm

from services.planner.errors import PlannerError
from services.planner.spec import LengthDistribution, Workload

QUANTILE_POINTS = 64  # points that stand for a length distribution in the analytic model
LARGEST_QUANTILE = 0.999  # the length a request must be able to reach (memory fit)


@dataclass(frozen=True, eq=False)
class Lengths:
    """A token-count distribution: `quantile(u)` for u in (0, 1), clipped to [1, max]."""

    kind: str
    mean: float
    cv: float = 0.5
    maximum: int | None = None
    empirical: np.ndarray | None = None  # sorted, for traces

    def quantile(self, u: np.ndarray) -> np.ndarray:
        if self.empirical is not None:
            raw = np.quantile(self.empirical, u, method="inverted_cdf")
        elif self.kind == "fixed":
            raw = np.full_like(u, self.mean, dtype=float)
        elif self.kind == "exponential":
            raw = -self.mean * np.log1p(-u)
        elif self.kind == "uniform":
            raw = 1 + u * (2 * self.mean - 2)
        else:  # lognormal with mean `mean` and coefficient of variation `cv`
            sigma = np.sqrt(np.log1p(self.cv**2))
            raw = np.exp(np.log(self.mean) - sigma**2 / 2 + sigma * norm.ppf(u))
        upper = self.maximum if self.maximum is not None else np.inf
        return np.clip(np.rint(raw), 1, upper)

    @cached_property
    def points(self) -> np.ndarray:
        """Equally likely representative lengths (mid-quantiles)."""
        return self.quantile((np.arange(QUANTILE_POINTS) + 0.5) / QUANTILE_POINTS)

    @cached_property
    def largest(self) -> int:
        """The length a request must be able to reach (the LARGEST_QUANTILE)."""
        return int(self.quantile(np.array([LARGEST_QUANTILE]))[0])

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.quantile(rng.random(n)).astype(np.int64)


@dataclass(frozen=True)
class RequestMix:
    """What arrives: Poisson at `rate` requests/s, with independent prompt and output lengths."""

    rate: float | None
    prompt: Lengths
    output: Lengths

    @property
    def mean_prompt(self) -> float:
        return float(self.prompt.points.mean())

    @property
    def mean_output(self) -> float:
        return float(self.output.points.mean())

    def with_rate(self, rate: float) -> RequestMix:
        return RequestMix(rate=rate, prompt=self.prompt, output=self.output)


def _from_distribution(dist: LengthDistribution) -> Lengths:
    return Lengths(kind=dist.distribution, mean=dist.mean, cv=dist.cv, maximum=dist.max)


def _read_trace(path: Path) -> tuple[np.ndarray, np.ndarray, float | None]:
    prompts: list[int] = []
    outputs: list[int] = []
    arrivals: list[float] = []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise PlannerError(f"workload.trace: cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"workload.trace: {path} line {number}"
        try:
            record = json.loads(line)
            prompt, output = int(record["prompt_tokens"]), int(record["output_tokens"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise PlannerError(
                f"{where}: expected a JSON object with integer prompt_tokens and output_tokens"
            ) from None
        if prompt < 1 or output < 1:
            raise PlannerError(f"{where}: token counts must be >= 1 (got {prompt}, {output})")
        prompts.append(prompt)
        outputs.append(output)
        if "arrival_s" in record:
            arrivals.append(float(record["arrival_s"]))
    if not prompts:
        raise PlannerError(f"workload.trace: {path} holds no requests")
    if max(outputs) < 2:
        raise PlannerError(f"workload.trace: {path}: every request has one output token; no decode")
    rate = None
    if len(arrivals) == len(prompts) and len(arrivals) > 1 and max(arrivals) > min(arrivals):
        rate = (len(arrivals) - 1) / (max(arrivals) - min(arrivals))
    return np.sort(np.array(prompts)), np.sort(np.array(outputs)), rate


def resolve_workload(workload: Workload) -> RequestMix:
    if workload.trace is not None:
        prompts, outputs, trace_rate = _read_trace(workload.trace)
        return RequestMix(
            rate=workload.rate if workload.rate is not None else trace_rate,
            prompt=Lengths(kind="trace", mean=float(prompts.mean()), empirical=prompts),
            output=Lengths(kind="trace", mean=float(outputs.mean()), empirical=outputs),
        )
    assert workload.prompt_tokens is not None and workload.output_tokens is not None
    return RequestMix(
        rate=workload.rate,
        prompt=_from_distribution(workload.prompt_tokens),
        output=_from_distribution(workload.output_tokens),
    )
