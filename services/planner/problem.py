"""The instance-count problem that the MILP and the exhaustive oracle both solve.

Variables: n_c instances of each candidate configuration c, and flows x_{c,b} (requests/s
prefilled by configuration c and decoded on GPU type b). Constraints:
  prefill   sum_b x_{c,b} / r_{c,b} <= n_c       (time-sharing an instance between destinations)
  decode    sum_c x_{c,b} <= sum_{d on b} r_d n_d
  demand    sum x + sum_{colocated} r_k n_k >= demand      (min_cost)
  inventory sum_{c on t} gpus_c n_c <= count_t
  links     sum_{c on a} x_{c,b} <= link_rate_{a,b}
Objective: least cost per hour; or, with a budget instead of a demand, the most requests/s
served (ties broken by cost).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["prefill", "decode", "colocated"]


@dataclass(frozen=True, eq=False)
class Config:
    """One candidate instance shape for one role, with what it sustains under the SLO.

    Prefill rates depend on the decode type the KV goes to (`rate_to`); decode and colocated
    instances have one `rate`."""

    role: Role
    gpu: str
    tp: int
    pp: int
    price_per_hour: float  # the whole instance
    rate: float = 0.0
    rate_to: Mapping[str, float] = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def label(self) -> str:
        return f"{self.role} {self.gpu} tp={self.tp} pp={self.pp}"

    def best_rate(self) -> float:
        return max(self.rate_to.values(), default=0.0) if self.role == "prefill" else self.rate

    def worst_positive_rate(self) -> float:
        if self.role != "prefill":
            return self.rate
        return min((r for r in self.rate_to.values() if r > 0), default=0.0)


@dataclass(frozen=True, eq=False)
class CapacityProblem:
    configs: tuple[Config, ...]
    inventory: Mapping[str, int]
    link_rate: Mapping[tuple[str, str], float]  # requests/s the KV path carries
    demand: float | None = None  # requests/s to serve at least cost
    budget: float | None = None  # per hour, to serve the most requests/s within

    @property
    def decode_types(self) -> list[str]:
        return sorted({c.gpu for c in self.configs if c.role == "decode"})

    def cost(self, counts: tuple[int, ...]) -> float:
        return sum(n * c.price_per_hour for n, c in zip(counts, self.configs, strict=True))

    def restricted(self, keep: list[int]) -> CapacityProblem:
        return CapacityProblem(
            configs=tuple(self.configs[i] for i in keep),
            inventory=self.inventory,
            link_rate=self.link_rate,
            demand=self.demand,
            budget=self.budget,
        )


@dataclass(frozen=True)
class Allocation:
    """A solution: instances per configuration (by index) and the KV flows between them."""

    counts: tuple[int, ...]
    flows: Mapping[tuple[int, str], float]  # (prefill config index, decode type) -> req/s
    served: float  # requests/s the allocation carries
    cost: float  # per hour
    gap: float = 0.0  # relative distance to the solver's proven bound (0: proven optimal)


@dataclass(frozen=True)
class Infeasible:
    reason: str


Solution = Allocation | Infeasible
