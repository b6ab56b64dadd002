"""Plan a deployment: search, solve, check in simulation, and compare with the baselines."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from services.planner.baselines import single_type, solve_distserve
from services.planner.capacity import prefill_queue, tpot_quantile
from services.planner.confirm import Checked, Confirmer, Solver
from services.planner.explain import explain_infeasible
from services.planner.inputs import PlanInputs
from services.planner.milp import solve_milp
from services.planner.perf_model import PerfModel
from services.planner.problem import Allocation, CapacityProblem, Infeasible
from services.planner.search import Rejection, SearchResult, build_problem


@dataclass(frozen=True)
class PoolSummary:
    """Instances of one configuration in a plan."""

    role: str
    gpu: str
    tp: int
    pp: int
    instances: int
    cost_per_hour: float
    rate_per_instance: float  # requests/s one instance sustains within the SLO
    load: float  # requests/s routed through the pool
    limit: str  # what bounds the rate
    predicted_s: float | None  # queueing estimate at this load: TTFT (prefill) or TPOT (decode)

    @property
    def gpus(self) -> int:
        return self.instances * self.tp * self.pp

    @property
    def utilisation(self) -> float:
        """Share of the pool's SLO-bounded capacity the load uses."""
        return self.load / (self.instances * self.rate_per_instance)


@dataclass(frozen=True)
class Simulated:
    ttft_s: float  # at the SLO percentile
    tpot_s: float
    attainment: float  # share of requests meeting both targets
    meets_slo: bool
    busy: dict[str, float]  # role -> mean busy share of its instances


@dataclass(frozen=True)
class Outcome:
    name: str
    feasible: bool
    reason: str
    cost_per_hour: float | None
    served_rate: float
    pools: tuple[PoolSummary, ...]
    kv_paths: tuple[tuple[str, str, float], ...]  # (from type, to type, requests/s)
    simulated: Simulated | None
    notes: tuple[str, ...]


@dataclass(frozen=True)
class PlanReport:
    inputs: PlanInputs
    plan: Outcome
    baselines: tuple[Outcome, ...]
    rejected: tuple[Rejection, ...]
    seconds: dict[str, float]  # stage -> wall time


def _pools(
    inputs: PlanInputs,
    problem: CapacityProblem,
    perf: tuple[PerfModel, ...],
    limits: tuple[str, ...],
    allocation: Allocation,
) -> tuple[PoolSummary, ...]:
    level = inputs.level
    pools = []
    for i, (n, config) in enumerate(zip(allocation.counts, problem.configs, strict=True)):
        if not n:
            continue
        if config.role == "prefill":
            out = {b: rate for (j, b), rate in allocation.flows.items() if j == i}
            load = sum(out.values())
            slowest = min(out, key=lambda b: inputs.link_gbps[(config.gpu, b)], default=config.gpu)
            rate = config.rate_to[slowest]
            queue = prefill_queue(perf[i], inputs.mix, inputs.link_gbps[(config.gpu, slowest)])
            predicted: float | None = queue.quantile(load / n, level)
        elif config.role == "decode":
            load = sum(r for (_, b), r in allocation.flows.items() if b == config.gpu)
            supply = sum(
                m * c.rate
                for m, c in zip(allocation.counts, problem.configs, strict=True)
                if c.role == "decode" and c.gpu == config.gpu
            )
            load *= n * config.rate / supply  # decode load splits in proportion to capacity
            rate = config.rate
            predicted = tpot_quantile(perf[i], inputs.mix, load / n, level, inputs.search.max_batch)
        else:
            rate = config.rate
            colocated = sum(
                m * c.rate
                for m, c in zip(allocation.counts, problem.configs, strict=True)
                if c.role == "colocated"
            )
            load = allocation.served * n * rate / colocated
            predicted = None
        pools.append(
            PoolSummary(
                role=config.role,
                gpu=config.gpu,
                tp=config.tp,
                pp=config.pp,
                instances=n,
                cost_per_hour=n * config.price_per_hour,
                rate_per_instance=rate,
                load=load,
                limit=limits[i],
                predicted_s=predicted,
            )
        )
    return tuple(pools)


def _outcome(
    name: str,
    inputs: PlanInputs,
    checked: Checked,
    perf: tuple[PerfModel, ...],
    limits: tuple[str, ...],
    confirmer: Confirmer,
    why: Callable[[CapacityProblem], str] | None = None,
) -> Outcome:
    solution = checked.solution
    if isinstance(solution, Infeasible):
        reason = why(checked.problem) if why is not None else solution.reason
        return Outcome(name, False, reason, None, 0.0, (), (), None, checked.notes)
    paths: dict[tuple[str, str], float] = {}
    for (i, b), rate in solution.flows.items():
        key = (checked.problem.configs[i].gpu, b)
        paths[key] = paths.get(key, 0.0) + rate
    simulated = None
    if checked.simulation is not None:
        sim = checked.simulation
        slo = inputs.slo
        ttft, tpot = sim.quantiles(slo.percentile)
        simulated = Simulated(
            ttft, tpot, sim.attainment(slo.ttft_s, slo.tpot_s), confirmer.meets_slo(sim), sim.busy
        )
    return Outcome(
        name=name,
        feasible=True,
        reason="",
        cost_per_hour=solution.cost,
        served_rate=solution.served,
        pools=_pools(inputs, checked.problem, perf, limits, solution),
        kv_paths=tuple((a, b, r) for (a, b), r in sorted(paths.items())),
        simulated=simulated,
        notes=checked.notes,
    )


def _run(
    problem: CapacityProblem,
    perf: tuple[PerfModel, ...],
    solver: Solver,
    confirmer: Confirmer,
    simulate: bool,
) -> Checked:
    if simulate:
        return confirmer.check(problem, perf, solver)
    return Checked(solver(problem), problem, None, ())


def _better(a: Outcome, b: Outcome, goodput: bool) -> bool:
    if not b.feasible:
        return True
    if not a.feasible:
        return False
    if goodput:
        return (a.served_rate, -(a.cost_per_hour or 0)) > (b.served_rate, -(b.cost_per_hour or 0))
    return (a.cost_per_hour or 0) < (b.cost_per_hour or 0)


def _baselines(
    inputs: PlanInputs, searches: Searches, confirmer: Confirmer, simulate: bool
) -> tuple[Outcome, ...]:
    goodput = inputs.objective == "max_goodput"
    search = searches.disaggregated
    singles = []
    for gpu in inputs.gpus:
        problem, perf = single_type(search, gpu)
        limits = tuple(
            search.limits[i] for i, c in enumerate(search.problem.configs) if c.gpu == gpu
        )
        checked = _run(problem, perf, solve_milp, confirmer, simulate)
        singles.append(_outcome(f"single type ({gpu})", inputs, checked, perf, limits, confirmer))
    best = singles[0]
    for outcome in singles[1:]:
        if _better(outcome, best, goodput):
            best = outcome
    if not best.feasible:
        reasons = "; ".join(f"{o.name}: {o.reason}" for o in singles)
        best = Outcome("single type", False, reasons, None, 0.0, (), (), None, ())
    colocated = searches.colocated
    assert colocated is not None  # searched whenever baselines are asked for
    together = _outcome(
        "colocated (no P/D)",
        inputs,
        _run(colocated.problem, colocated.perf, solve_milp, confirmer, simulate),
        colocated.perf,
        colocated.limits,
        confirmer,
        lambda problem: explain_infeasible(
            inputs, replace(colocated, problem=problem), colocated=True
        ),
    )
    distserve = _outcome(
        "DistServe-style (per phase)",
        inputs,
        _run(search.problem, search.perf, solve_distserve, confirmer, simulate),
        search.perf,
        search.limits,
        confirmer,
    )
    return best, together, distserve


@dataclass(frozen=True)
class Searches:
    """What each configuration sustains does not depend on the demand: one search serves a
    sweep of arrival rates (`for_inputs` sets the demand)."""

    disaggregated: SearchResult
    colocated: SearchResult | None

    def for_inputs(self, inputs: PlanInputs) -> Searches:
        colocated = None if self.colocated is None else _with_demand(self.colocated, inputs)
        return Searches(_with_demand(self.disaggregated, inputs), colocated)


def _with_demand(search: SearchResult, inputs: PlanInputs) -> SearchResult:
    problem = replace(
        search.problem,
        demand=inputs.mix.rate if inputs.objective == "min_cost" else None,
        budget=inputs.budget_per_hour if inputs.objective == "max_goodput" else None,
    )
    return replace(search, problem=problem)


def search_all(inputs: PlanInputs, baselines: bool = True) -> Searches:
    colocated = build_problem(inputs, "colocated") if baselines else None
    return Searches(build_problem(inputs), colocated)


def plan(
    inputs: PlanInputs,
    simulate: bool = True,
    baselines: bool = True,
    searches: Searches | None = None,
) -> PlanReport:
    """The cheapest plan (or the most goodput within the budget), checked in simulation when
    `simulate`, with the baselines when `baselines`; `searches` from an earlier call with
    the same inputs but another rate saves the search."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if searches is None:
        searches = search_all(inputs, baselines)
    else:
        searches = searches.for_inputs(inputs)
    search = searches.disaggregated
    seconds["search"] = time.perf_counter() - start
    confirmer = Confirmer(inputs)
    start = time.perf_counter()
    checked = _run(search.problem, search.perf, solve_milp, confirmer, simulate)
    seconds["solve_and_check" if simulate else "solve"] = time.perf_counter() - start
    main = _outcome(
        "plan",
        inputs,
        checked,
        search.perf,
        search.limits,
        confirmer,
        lambda problem: explain_infeasible(inputs, replace(search, problem=problem)),
    )
    others: tuple[Outcome, ...] = ()
    if baselines:
        start = time.perf_counter()
        others = _baselines(inputs, searches, confirmer, simulate)
        seconds["baselines"] = time.perf_counter() - start
    return PlanReport(inputs, main, others, search.rejected, seconds)


def cost_per_million_tokens(inputs: PlanInputs, outcome: Outcome) -> float | None:
    """Per million tokens processed (prompt + output)."""
    if outcome.cost_per_hour is None or outcome.served_rate <= 0:
        return None
    tokens_per_hour = outcome.served_rate * (inputs.mix.mean_prompt + inputs.mix.mean_output) * 3600
    return outcome.cost_per_hour / tokens_per_hour * 1e6
