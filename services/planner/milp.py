"""Solve the instance-count problem exactly with a MILP (scipy.optimize.milp, i.e. HiGHS)."""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from services.planner.errors import PlannerError
from services.planner.problem import Allocation, CapacityProblem, Config, Infeasible, Solution

TIME_LIMIT_S = 10.0  # per solve; past it the best solution found is kept, with its gap
_FLOW_EPSILON = 1e-9


def _dominates(better: Config, worse: Config) -> bool:
    """Whether k copies of `better` (k = worse.gpus // better.gpus) carry at least what one
    `worse` carries, on the same GPU type and in the same role. Replacing `worse` by them keeps
    any solution feasible (same inventory or less, every rate covered) at no higher cost,
    because an instance's price is its GPU count times the type's price."""
    if better.role != worse.role or better.gpu != worse.gpu or better.gpus > worse.gpus:
        return False
    copies = worse.gpus // better.gpus
    if worse.role == "prefill":
        return all(copies * better.rate_to.get(b, 0.0) >= r for b, r in worse.rate_to.items())
    return copies * better.rate >= worse.rate


def undominated(problem: CapacityProblem) -> list[int]:
    """Indices of configurations no other one dominates (on a tie, the earlier one stays)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, config in enumerate(problem.configs):
        groups.setdefault((config.role, config.gpu), []).append(i)
    configs = problem.configs
    keep = []
    for members in groups.values():
        for i in members:
            beaten = any(
                j != i
                and _dominates(configs[j], configs[i])
                and (j < i or not _dominates(configs[i], configs[j]))
                for j in members
            )
            if not beaten:
                keep.append(i)
    return sorted(keep)


@contextmanager
def _solver_prints_to_stderr() -> Iterator[None]:
    """HiGHS sometimes prints diagnostics with C stdio; keep them off stdout, which carries
    the plan (JSON), by pointing file descriptor 1 at stderr while it runs."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


class _Layout:
    """Column indices: instance counts, then flows (prefill config, decode type), then z."""

    def __init__(self, problem: CapacityProblem) -> None:
        self.n = len(problem.configs)
        decode_types = set(problem.decode_types)
        self.flows = [
            (i, b)
            for i, c in enumerate(problem.configs)
            if c.role == "prefill"
            for b, rate in sorted(c.rate_to.items())
            if rate > 0 and b in decode_types
        ]
        self.z = self.n + len(self.flows)
        self.width = self.z + 1


def _constraints(problem: CapacityProblem, layout: _Layout) -> LinearConstraint:
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    lower: list[float] = []
    upper: list[float] = []

    def row(entries: list[tuple[int, float]], lo: float, hi: float) -> None:
        index = len(lower)
        for col, val in entries:
            rows.append(index)
            cols.append(col)
            vals.append(val)
        lower.append(lo)
        upper.append(hi)

    configs = problem.configs
    flow_cols = {pair: layout.n + k for k, pair in enumerate(layout.flows)}
    for i, c in enumerate(configs):
        if c.role == "prefill":
            mine = [(col, 1 / c.rate_to[b]) for (j, b), col in flow_cols.items() if j == i]
            row([*mine, (i, -1.0)], -np.inf, 0.0)
    for b in problem.decode_types:
        inflow = [(col, 1.0) for (_, d), col in flow_cols.items() if d == b]
        supply = [(i, -c.rate) for i, c in enumerate(configs) if c.role == "decode" and c.gpu == b]
        row(inflow + supply, -np.inf, 0.0)
    colocated = [(i, c.rate) for i, c in enumerate(configs) if c.role == "colocated"]
    flows = [(col, 1.0) for col in flow_cols.values()]
    row([*flows, *colocated, (layout.z, -1.0)], 0.0, np.inf)  # capacity covers z, the rate served
    row([*flows, (layout.z, -1.0)], -np.inf, 0.0)  # and KV flows carry no more than z
    # Implied by the rows above, but explicit knapsack rows let the solver cut on them.
    for role in ("prefill", "decode"):
        supply = [(i, c.best_rate()) for i, c in enumerate(configs) if c.role == role]
        if supply:
            row([*supply, *colocated, (layout.z, -1.0)], 0.0, np.inf)
    for t, count in problem.inventory.items():
        row([(i, float(c.gpus)) for i, c in enumerate(configs) if c.gpu == t], -np.inf, count)
    for (a, b), rate in problem.link_rate.items():
        on_path = [
            (col, 1.0) for (i, d), col in flow_cols.items() if d == b and configs[i].gpu == a
        ]
        if on_path:
            row(on_path, -np.inf, rate)
    if problem.budget is not None:
        row([(i, c.price_per_hour) for i, c in enumerate(configs)], -np.inf, problem.budget)
    matrix = coo_array((vals, (rows, cols)), shape=(len(lower), layout.width)).tocsr()
    return LinearConstraint(matrix, lower, upper)


def _solve(
    problem: CapacityProblem,
    layout: _Layout,
    objective: np.ndarray,
    z_range: tuple[float, float],
    counts: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, float] | None:
    """Solve with the served rate z within `z_range` (and the instance counts fixed to
    `counts` when given): the solution and its relative gap to the proven bound (0 unless
    the time limit stopped the proof), or None when that is infeasible."""
    configs = problem.configs
    lower = np.zeros(layout.width)
    upper = np.full(layout.width, np.inf)
    for i, c in enumerate(configs):
        upper[i] = problem.inventory.get(c.gpu, 0) // c.gpus
        if problem.demand is not None and c.worst_positive_rate() > 0:
            # more instances than carry the whole demand alone are never optimal (the oracle
            # uses the same bound): dropping one keeps every flow feasible at less cost
            needed = math.ceil(problem.demand / c.worst_positive_rate())
            upper[i] = min(upper[i], needed)
    if counts is not None:
        lower[: layout.n] = upper[: layout.n] = counts
    lower[layout.z], upper[layout.z] = z_range
    integrality = np.zeros(layout.width)
    integrality[: layout.n] = 1
    with _solver_prints_to_stderr():
        result = milp(
            objective,
            constraints=_constraints(problem, layout),
            integrality=integrality,
            bounds=Bounds(lower, upper),
            options={"mip_rel_gap": 0.0, "time_limit": TIME_LIMIT_S},
        )
    if result.status == 2:  # proven infeasible
        return None
    if result.x is None:
        raise PlannerError(f"MILP solver stopped without a solution: {result.message}")
    if result.status == 0:
        return result.x, 0.0
    if result.status == 1:  # the time limit, with a solution: keep it, and say how far
        gap = getattr(result, "mip_gap", None)
        return result.x, float(gap) if gap is not None and np.isfinite(gap) else float("inf")
    raise PlannerError(f"MILP solver did not prove optimality: {result.message}")


def _allocation(problem: CapacityProblem, layout: _Layout, x: np.ndarray) -> Allocation:
    counts = tuple(int(round(v)) for v in x[: layout.n])
    flows = {
        pair: float(x[layout.n + k])
        for k, pair in enumerate(layout.flows)
        if x[layout.n + k] > _FLOW_EPSILON
    }
    return Allocation(
        counts=counts, flows=flows, served=float(x[layout.z]), cost=problem.cost(counts)
    )


def solve_milp(problem: CapacityProblem) -> Solution:
    """The optimal allocation, or Infeasible when none meets the demand (or, for max-goodput,
    when the budget buys nothing that serves any request)."""
    keep = undominated(problem)
    reduced = problem.restricted(keep)
    layout = _Layout(reduced)
    prices = np.zeros(layout.width)
    prices[: layout.n] = [c.price_per_hour for c in reduced.configs]
    if problem.demand is not None:
        found = _solve(reduced, layout, prices, (problem.demand, problem.demand))
    else:
        goodput = np.zeros(layout.width)
        goodput[layout.z] = -1.0
        first = _solve(reduced, layout, goodput, (0.0, np.inf))
        if first is None or first[0][layout.z] <= _FLOW_EPSILON:
            return Infeasible("no instance set within the inventory and budget serves any request")
        found = _solve(reduced, layout, prices, (first[0][layout.z] * (1 - 1e-9), np.inf))
        if found is not None:
            found = (found[0], max(found[1], first[1]))
    if found is None:
        return Infeasible(f"no allocation within the inventory serves {problem.demand:g} req/s")
    x, gap = found
    local = _allocation(reduced, layout, x)
    counts = [0] * len(problem.configs)
    for k, i in enumerate(keep):
        counts[i] = local.counts[k]
    flows = {(keep[k], b): rate for (k, b), rate in local.flows.items()}
    return Allocation(
        counts=tuple(counts),
        flows=flows,
        served=local.served,
        cost=problem.cost(tuple(counts)),
        gap=gap,
    )


def refit(problem: CapacityProblem, counts: tuple[int, ...]) -> Allocation | None:
    """The same instance counts with flows that fit `problem` (min_cost), or None when they
    no longer serve the demand. When `problem` only lowers rates of a problem to which
    `counts` was optimal, a refit is optimal too: lowering rates cannot make the optimum
    cheaper, and these counts still cost what it did."""
    if problem.demand is None:
        return None
    layout = _Layout(problem)
    found = _solve(
        problem, layout, np.zeros(layout.width), (problem.demand, problem.demand), counts
    )
    return None if found is None else _allocation(problem, layout, found[0])
