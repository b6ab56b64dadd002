"""Exhaustive search over instance counts: the reference the MILP is tested against.

Every vector of counts within the inventory is listed. For min_cost the count of a
configuration c is also bounded by ceil(demand / r_c), r_c its smallest positive rate: with more,
c alone could carry the whole demand, so dropping one instance keeps any flow feasible at lower
cost. Vectors are then tried from the cheapest up; each is checked with a flow LP; the first
feasible one is optimal. For max_goodput every vector within the budget gets its LP.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linprog

from services.planner.errors import PlannerError
from services.planner.problem import Allocation, CapacityProblem, Infeasible, Solution

MAX_CANDIDATES = 2_000_000


def _candidates(problem: CapacityProblem) -> list[tuple[int, ...]]:
    configs = problem.configs
    bounds = []
    for c in configs:
        bound = problem.inventory.get(c.gpu, 0) // c.gpus
        if problem.demand is not None and c.worst_positive_rate() > 0:
            bound = min(bound, math.ceil(problem.demand / c.worst_positive_rate()))
        bounds.append(bound)
    found: list[tuple[int, ...]] = []
    counts = [0] * len(configs)
    left = dict(problem.inventory)

    def walk(i: int) -> None:
        if i == len(configs):
            found.append(tuple(counts))
            if len(found) > MAX_CANDIDATES:
                raise PlannerError(
                    f"oracle: more than {MAX_CANDIDATES} candidates; instance too large"
                )
            return
        c = configs[i]
        for n in range(min(bounds[i], left[c.gpu] // c.gpus) + 1):
            counts[i] = n
            left[c.gpu] -= n * c.gpus
            walk(i + 1)
            left[c.gpu] += n * c.gpus
        counts[i] = 0

    walk(0)
    return found


def _max_flow(
    problem: CapacityProblem, counts: tuple[int, ...]
) -> tuple[float, dict[tuple[int, str], float]]:
    """Most requests/s these counts serve (capped at the demand when there is one)."""
    configs = problem.configs
    decode_supply = {b: 0.0 for b in problem.decode_types}
    colocated = 0.0
    for n, c in zip(counts, configs, strict=True):
        if c.role == "decode":
            decode_supply[c.gpu] += n * c.rate
        elif c.role == "colocated":
            colocated += n * c.rate
    pairs = [
        (i, b)
        for i, (n, c) in enumerate(zip(counts, configs, strict=True))
        if c.role == "prefill" and n > 0
        for b, r in c.rate_to.items()
        if r > 0 and decode_supply.get(b, 0.0) > 0
    ]
    if not pairs:
        return colocated, {}
    a_ub: list[list[float]] = []
    b_ub: list[float] = []
    for i in {i for i, _ in pairs}:
        a_ub.append([1 / configs[i].rate_to[b] if j == i else 0.0 for j, b in pairs])
        b_ub.append(float(counts[i]))
    for b, supply in decode_supply.items():
        a_ub.append([1.0 if d == b else 0.0 for _, d in pairs])
        b_ub.append(supply)
    for (a, b), rate in problem.link_rate.items():
        a_ub.append([1.0 if d == b and configs[j].gpu == a else 0.0 for j, d in pairs])
        b_ub.append(rate)
    if problem.demand is not None:
        a_ub.append([1.0] * len(pairs))
        b_ub.append(max(problem.demand - colocated, 0.0))
    result = linprog(-np.ones(len(pairs)), A_ub=a_ub, b_ub=b_ub, bounds=(0, None), method="highs")
    if result.status != 0:
        raise PlannerError(f"oracle: flow LP failed: {result.message}")
    flows = {pair: float(v) for pair, v in zip(pairs, result.x, strict=True) if v > 1e-9}
    return colocated + float(-result.fun), flows


def solve_exhaustive(problem: CapacityProblem) -> Solution:
    """The optimal allocation by enumeration, or Infeasible when none is."""
    ranked = sorted(_candidates(problem), key=problem.cost)
    if problem.demand is not None:
        demand = problem.demand
        for counts in ranked:
            if _necessary(problem, counts, demand):
                served, flows = _max_flow(problem, counts)
                if served >= demand * (1 - 1e-9):
                    return Allocation(counts, flows, served, problem.cost(counts))
        return Infeasible(f"no allocation within the inventory serves {demand:g} req/s")
    budget = problem.budget if problem.budget is not None else math.inf
    best: Allocation | None = None
    for counts in ranked:
        cost = problem.cost(counts)
        if cost > budget * (1 + 1e-12):
            break
        served, flows = _max_flow(problem, counts)
        if served > 1e-9 and (best is None or served > best.served * (1 + 1e-9)):
            best = Allocation(counts, flows, served, cost)
    return best if best is not None else Infeasible("the budget buys nothing that serves requests")


def _necessary(problem: CapacityProblem, counts: tuple[int, ...], demand: float) -> bool:
    """Cheap bounds any feasible vector meets: enough prefill and decode capacity."""
    prefill = decode = 0.0
    for n, c in zip(counts, problem.configs, strict=True):
        if c.role == "prefill":
            prefill += n * c.best_rate()
        elif c.role == "decode":
            decode += n * c.rate
        else:
            prefill += n * c.rate
            decode += n * c.rate
    return prefill >= demand * (1 - 1e-9) and decode >= demand * (1 - 1e-9)
