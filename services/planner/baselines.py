"""The plans the planner is compared against, built from the same search (restrictions of it):
the best single-GPU-type disaggregated plan (the MILP on one type), the best colocated plan (the
MILP over instances that run both phases), and a DistServe-style plan that sizes each phase on
its own, ignoring the other phase's GPUs and where its KV has to go. Each is a candidate: the
planner reports a baseline as its plan when it meets the SLO at less cost (planner.py)."""

from __future__ import annotations

import math
from dataclasses import replace

from services.planner.problem import Allocation, CapacityProblem, Config, Infeasible, Solution
from services.planner.search import SearchResult


def single_type(search: SearchResult, gpu: str) -> SearchResult:
    """The disaggregated search restricted to one GPU type for both phases."""
    own = search.restricted(("prefill", "decode"), gpu)
    problem = own.problem
    configs = tuple(
        replace(c, rate_to={gpu: c.rate_to.get(gpu, 0.0)}) if c.role == "prefill" else c
        for c in problem.configs
    )
    restricted = replace(
        problem,
        configs=configs,
        inventory={gpu: problem.inventory[gpu]},
        link_rate={(gpu, gpu): problem.link_rate[(gpu, gpu)]},
    )
    return replace(own, problem=restricted)


def _own_rate(config: Config) -> float:
    """What a per-phase planner believes: prefill KV stays within its own pool."""
    return config.rate_to.get(config.gpu, 0.0) if config.role == "prefill" else config.rate


def _cheapest(problem: CapacityProblem, role: str, demand: float) -> tuple[int, int] | None:
    """(config index, instances) that alone serve `demand` at least cost within its type."""
    best: tuple[float, int, int] | None = None
    for i, c in enumerate(problem.configs):
        rate = _own_rate(c)
        if c.role != role or rate <= 0:
            continue
        n = math.ceil(demand / rate * (1 - 1e-12))
        if n * c.gpus <= problem.inventory[c.gpu] and (
            best is None or n * c.price_per_hour < best[0]
        ):
            best = (n * c.price_per_hour, i, n)
    return None if best is None else (best[1], best[2])


def _combine(problem: CapacityProblem, p: int, n_p: int, d: int, n_d: int, rate: float) -> Solution:
    prefill, decode = problem.configs[p], problem.configs[d]
    need = {prefill.gpu: n_p * prefill.gpus}
    need[decode.gpu] = need.get(decode.gpu, 0) + n_d * decode.gpus
    for gpu, count in need.items():
        if count > problem.inventory[gpu]:
            return Infeasible(
                f"prefill ({n_p} x {prefill.label()}) and decode ({n_d} x {decode.label()}) "
                f"need {count} {gpu} GPUs; the inventory has {problem.inventory[gpu]}"
            )
    actual = n_p * prefill.rate_to.get(decode.gpu, 0.0)
    if actual < rate * (1 - 1e-9):
        return Infeasible(
            f"prefill sized for KV that stays in its pool sustains {actual:.3g} req/s when its "
            f"KV goes to {decode.gpu} (demand {rate:.3g})"
        )
    link = problem.link_rate.get((prefill.gpu, decode.gpu), 0.0)
    if link < rate * (1 - 1e-9):
        return Infeasible(
            f"the KV path {prefill.gpu} -> {decode.gpu} carries at most {link:.3g} req/s "
            f"(demand {rate:.3g})"
        )
    counts = [0] * len(problem.configs)
    counts[p], counts[d] = n_p, n_d
    return Allocation(tuple(counts), {(p, decode.gpu): rate}, rate, problem.cost(tuple(counts)))


def solve_distserve(problem: CapacityProblem) -> Solution:
    """Each phase picks its own cheapest homogeneous configuration for the demand (or, with a
    budget, the one with the most requests/s per dollar, grown while the budget allows)."""
    if problem.demand is not None:
        picks = [_cheapest(problem, role, problem.demand) for role in ("prefill", "decode")]
        if picks[0] is None or picks[1] is None:
            phase = "prefill" if picks[0] is None else "decode"
            return Infeasible(
                f"no single {phase} configuration serves {problem.demand:g} req/s alone"
            )
        (p, n_p), (d, n_d) = picks
        return _combine(problem, p, n_p, d, n_d, problem.demand)
    budget = problem.budget if problem.budget is not None else math.inf
    per_dollar = {}
    for role in ("prefill", "decode"):
        ranked = [
            (_own_rate(c) / c.price_per_hour, i)
            for i, c in enumerate(problem.configs)
            if c.role == role and _own_rate(c) > 0
        ]
        if not ranked:
            return Infeasible(f"no {role} configuration meets the SLO")
        per_dollar[role] = max(ranked)[1]
    p, d = per_dollar["prefill"], per_dollar["decode"]
    best: Solution = Infeasible("the budget buys no prefill and decode pair")
    rates = sorted(
        k * _own_rate(problem.configs[i])
        for i in (p, d)
        for k in range(1, problem.inventory[problem.configs[i].gpu] // problem.configs[i].gpus + 1)
    )
    for rate in rates:
        n_p = math.ceil(rate / _own_rate(problem.configs[p]) * (1 - 1e-12))
        n_d = math.ceil(rate / problem.configs[d].rate * (1 - 1e-12))
        candidate = _combine(problem, p, n_p, d, n_d, rate)
        if isinstance(candidate, Allocation) and candidate.cost <= budget:
            best = candidate
    return best
