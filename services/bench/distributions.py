"""Length distributions for prompts and outputs, parsed from `name:arg,arg` strings.

    fixed:128            always 128
    uniform:64,256       integers in [64, 256], both ends included
    normal:128,32        mean 128, standard deviation 32, rounded, clipped to >= 1
    lognormal:128,0.5    mean 128 tokens, sigma 0.5 of the underlying normal, clipped to >= 1

Every sample is an integer >= 1. Sampling takes a numpy Generator so runs are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class LengthDistribution(Protocol):
    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` integer lengths (int64), each >= 1."""
        ...


def _clip(values: np.ndarray) -> np.ndarray:
    return np.maximum(np.rint(values), 1).astype(np.int64)


@dataclass(frozen=True)
class Fixed:
    value: int

    def __post_init__(self) -> None:
        if self.value < 1:
            raise ValueError(f"fixed length must be >= 1, got {self.value}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.value, dtype=np.int64)


@dataclass(frozen=True)
class Uniform:
    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"uniform needs 1 <= low <= high, got {self.low},{self.high}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high, size=n, endpoint=True, dtype=np.int64)


@dataclass(frozen=True)
class Normal:
    mean: float
    std: float

    def __post_init__(self) -> None:
        if self.std < 0:
            raise ValueError(f"normal needs std >= 0, got {self.std}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return _clip(rng.normal(self.mean, self.std, size=n))


@dataclass(frozen=True)
class LogNormal:
    """`mean` is the mean length in tokens; `sigma` the spread of log(length)."""

    mean: float
    sigma: float

    def __post_init__(self) -> None:
        if self.mean <= 0 or self.sigma < 0:
            raise ValueError(f"lognormal needs mean > 0, sigma >= 0, got {self.mean},{self.sigma}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = math.log(self.mean) - self.sigma**2 / 2  # so that E[length] == mean
        return _clip(rng.lognormal(mu, self.sigma, size=n))


def _ints(args: list[str]) -> list[int]:
    return [int(a) for a in args]


def _floats(args: list[str]) -> list[float]:
    return [float(a) for a in args]


# name -> (number of arguments, constructor from the argument strings)
DISTRIBUTIONS: dict[str, tuple[int, Callable[[list[str]], LengthDistribution]]] = {
    "fixed": (1, lambda a: Fixed(*_ints(a))),
    "uniform": (2, lambda a: Uniform(*_ints(a))),
    "normal": (2, lambda a: Normal(*_floats(a))),
    "lognormal": (2, lambda a: LogNormal(*_floats(a))),
}


def parse_distribution(spec: str) -> LengthDistribution:
    """`fixed:128` -> Fixed(128); a bare integer means fixed. Raises ValueError."""
    name, _, rest = spec.strip().partition(":")
    if not rest and name.isdigit():
        name, rest = "fixed", name
    if name not in DISTRIBUTIONS:
        known = ", ".join(DISTRIBUTIONS)
        raise ValueError(f"unknown distribution {name!r} in {spec!r} (known: {known})")
    arity, build = DISTRIBUTIONS[name]
    args = [a.strip() for a in rest.split(",")] if rest else []
    if len(args) != arity:
        raise ValueError(f"{name} takes {arity} argument(s), got {spec!r}")
    try:
        return build(args)
    except ValueError as e:
        raise ValueError(f"bad distribution {spec!r}: {e}") from None
