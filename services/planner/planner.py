"""Plan a deployment: search, solve, check in simulation, and compare with the baselines
(each a candidate: the plan never costs more than a baseline that meets the SLO)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from services.planner.baselines import single_type, solve_distserve
from services.planner.capacity import colocated_tpot_quantile, prefill_queue, tpot_quantile
from services.planner.confirm import Checked, Confirmer, Solver
from services.planner.explain import explain_infeasible
from services.planner.inputs import PlanInputs
from services.planner.milp import solve_milp
from services.planner.perf_model import PerfModel
from services.planner.problem import Allocation, CapacityProblem, Infeasible, Solution
from services.planner.search import Rejection, SearchResult, build_problem
from services.planner.speeds import Speed, instance_speed


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
    predicted_s: float | None  # queueing estimate at this load: TTFT (prefill) or TPOT
    speed: Speed  # per instance, from the performance model

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

    @property
    def meets_slo(self) -> bool:
        """Feasible and, when it was simulated, meeting the SLO there."""
        return self.feasible and (self.simulated is None or self.simulated.meets_slo)


JOINT_SEARCH = "joint search"
COLOCATED_BASELINE = "colocated (no P/D)"


@dataclass(frozen=True)
class PlanReport:
    inputs: PlanInputs
    plan: Outcome
    baselines: tuple[Outcome, ...]
    rejected: tuple[Rejection, ...]
    seconds: dict[str, float]  # stage -> wall time
    chosen: str = JOINT_SEARCH  # or the name of the baseline that is the plan


def _pools(
    inputs: PlanInputs,
    problem: CapacityProblem,
    perf: tuple[PerfModel, ...],
    limits: tuple[str, ...],
    allocation: Allocation,
) -> tuple[PoolSummary, ...]:
    level, max_batch = inputs.level, inputs.search.max_batch
    counts, configs = allocation.counts, problem.configs

    def supply(role: str, gpu: str | None = None) -> float:
        return sum(
            m * c.rate
            for m, c in zip(counts, configs, strict=True)
            if c.role == role and (gpu is None or c.gpu == gpu)
        )

    colocated_load = allocation.served - sum(allocation.flows.values())
    pools = []
    for i, (n, config) in enumerate(zip(counts, configs, strict=True)):
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
            load *= n * config.rate / supply("decode", config.gpu)  # split by capacity
            rate = config.rate
            predicted = tpot_quantile(perf[i], inputs.mix, load / n, level, max_batch)
        else:
            rate = config.rate
            load = max(colocated_load, 0.0) * n * rate / supply("colocated")
            predicted = colocated_tpot_quantile(perf[i], inputs.mix, load / n, level, max_batch)
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
                speed=instance_speed(perf[i], inputs.mix, config.role, load / n, rate, max_batch),
            )
        )
    return tuple(pools)


def _outcome(
    name: str,
    inputs: PlanInputs,
    checked: Checked,
    search: SearchResult,
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
        pools=_pools(inputs, checked.problem, search.perf, search.limits, solution),
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


def _rank(outcome: Outcome, goodput: bool) -> tuple[float, ...]:
    """Larger is better: feasible, then meeting the SLO in simulation, then (with max_goodput)
    more requests/s, then less cost."""
    if not outcome.feasible:
        return (0.0,)
    served = outcome.served_rate if goodput else 0.0
    return (1.0, float(outcome.meets_slo), served, -(outcome.cost_per_hour or 0.0))


def _better(a: Outcome, b: Outcome, goodput: bool) -> bool:
    return _rank(a, goodput) > _rank(b, goodput)


def _reusing(first: Solution, problem: CapacityProblem) -> Solver:
    """solve_milp, answering `problem` itself with its solution already found."""
    return lambda p: first if p is problem else solve_milp(p)


def _single_type(
    inputs: PlanInputs, search: SearchResult, confirmer: Confirmer, simulate: bool
) -> Outcome:
    """The best one-type plan. Simulation only lowers rates, so a type whose unchecked
    optimum already costs no less than a checked plan that meets the SLO cannot beat it and
    is not checked."""
    goodput = inputs.objective == "max_goodput"
    solved = []
    for gpu in inputs.gpus:
        own = single_type(search, gpu)
        solved.append((gpu, own, solve_milp(own.problem)))
    feasible = [(g, o, s) for g, o, s in solved if isinstance(s, Allocation)]
    if not feasible:
        reasons = "; ".join(f"single type ({g}): {s.reason}" for g, _, s in solved)
        return Outcome("single type", False, reasons, None, 0.0, (), (), None, ())
    feasible.sort(key=lambda item: (-item[2].served if goodput else 0.0, item[2].cost))
    best: Outcome | None = None
    for gpu, own, first in feasible:
        if (
            best is not None
            and not goodput
            and best.meets_slo
            and first.cost >= (best.cost_per_hour or 0.0)
        ):
            break
        checked = _run(own.problem, own.perf, _reusing(first, own.problem), confirmer, simulate)
        outcome = _outcome(f"single type ({gpu})", inputs, checked, own, confirmer)
        if best is None or _better(outcome, best, goodput):
            best = outcome
    assert best is not None  # at least one type is feasible
    return best


def _baselines(
    inputs: PlanInputs, search: SearchResult, confirmer: Confirmer, simulate: bool
) -> tuple[Outcome, ...]:
    single = _single_type(inputs, search, confirmer, simulate)
    colocated = search.restricted(("colocated",))
    together = _outcome(
        COLOCATED_BASELINE,
        inputs,
        _run(colocated.problem, colocated.perf, solve_milp, confirmer, simulate),
        colocated,
        confirmer,
        lambda problem: explain_infeasible(
            inputs, replace(colocated, problem=problem), roles=("colocated",)
        ),
    )
    apart = search.restricted(("prefill", "decode"))
    distserve = _outcome(
        "DistServe-style (per phase)",
        inputs,
        _run(apart.problem, apart.perf, solve_distserve, confirmer, simulate),
        apart,
        confirmer,
    )
    return single, together, distserve


def _with_demand(search: SearchResult, inputs: PlanInputs) -> SearchResult:
    problem = replace(
        search.problem,
        demand=inputs.mix.rate if inputs.objective == "min_cost" else None,
        budget=inputs.budget_per_hour if inputs.objective == "max_goodput" else None,
    )
    return replace(search, problem=problem)


def search_all(inputs: PlanInputs) -> SearchResult:
    """Every role's configurations (the baselines need them all). What each configuration
    sustains does not depend on the demand: one search serves a sweep of arrival rates
    (`plan(..., search=...)` sets the demand)."""
    return build_problem(inputs, "all")


def is_candidate(inputs: PlanInputs, baseline: Outcome) -> bool:
    """Whether the plan may be this baseline: any, but the colocated one when the spec keeps
    colocated instances out of the plan (`search.colocated: false`)."""
    return inputs.search.colocated or baseline.name != COLOCATED_BASELINE


def _as_plan(baseline: Outcome, joint: Outcome) -> Outcome:
    """A baseline that beats the joint search's checked plan becomes the plan, saying so."""
    if not joint.feasible:
        why = "the joint search found no plan"
    elif not joint.meets_slo:
        why = "the joint search's plan misses the SLO in simulation"
    else:
        why = f"the joint search's plan, after its simulation checks, costs {joint.cost_per_hour:,.2f}/h"
    note = f"the {baseline.name} baseline is the plan: {why}"
    return replace(baseline, name="plan", notes=(*baseline.notes, note))


def plan(
    inputs: PlanInputs,
    simulate: bool = True,
    baselines: bool = True,
    search: SearchResult | None = None,
) -> PlanReport:
    """The cheapest plan (or the most goodput within the budget) over prefill, decode and
    (unless `search.colocated` is false) colocated instances of every type, checked in
    simulation when `simulate`, with the baselines when `baselines`; a candidate baseline
    better than the checked plan (meets the SLO at less cost) is the plan. `search` from
    `search_all` with the same inputs but another rate saves the search."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    everything = search_all(inputs) if search is None else _with_demand(search, inputs)
    search = everything
    if not inputs.search.colocated:
        search = everything.restricted(("prefill", "decode"))
    seconds["search"] = time.perf_counter() - start
    confirmer = Confirmer(inputs)
    start = time.perf_counter()
    checked = _run(search.problem, search.perf, solve_milp, confirmer, simulate)
    seconds["solve_and_check" if simulate else "solve"] = time.perf_counter() - start
    main = _outcome(
        "plan",
        inputs,
        checked,
        search,
        confirmer,
        lambda problem: explain_infeasible(inputs, replace(search, problem=problem)),
    )
    others: tuple[Outcome, ...] = ()
    chosen = JOINT_SEARCH
    if baselines:
        start = time.perf_counter()
        others = _baselines(inputs, everything, confirmer, simulate)
        seconds["baselines"] = time.perf_counter() - start
        goodput = inputs.objective == "max_goodput"
        eligible = [b for b in others if is_candidate(inputs, b)]
        best = max(eligible, key=lambda o: _rank(o, goodput))
        if _better(best, main, goodput):
            main, chosen = _as_plan(best, main), best.name
    return PlanReport(inputs, main, others, search.rejected, seconds, chosen)


def cost_per_million_tokens(inputs: PlanInputs, outcome: Outcome) -> float | None:
    """Per million tokens processed (prompt + output)."""
    if outcome.cost_per_hour is None or outcome.served_rate <= 0:
        return None
    tokens_per_hour = outcome.served_rate * (inputs.mix.mean_prompt + inputs.mix.mean_output) * 3600
    return outcome.cost_per_hour / tokens_per_hour * 1e6
