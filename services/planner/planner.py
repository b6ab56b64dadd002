"""Plan a deployment: search, solve, check in simulation, and compare with the baselines
(each a candidate: the plan never costs more than a baseline that meets the SLO)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from services.planner.baselines import single_type, solve_distserve
from services.planner.confirm import Checked, Confirmer, Refit, Solver
from services.planner.explain import explain_infeasible
from services.planner.inputs import PlanInputs
from services.planner.milp import refit, solve_milp
from services.planner.outcome import Outcome, better, outcome_of, rank
from services.planner.perf_model import PerfModel
from services.planner.problem import Allocation, CapacityProblem, Solution
from services.planner.search import Rejection, SearchResult, build_problem

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


def _run(
    problem: CapacityProblem,
    perf: tuple[PerfModel, ...],
    solver: Solver,
    confirmer: Confirmer,
    simulate: bool,
) -> Checked:
    if simulate:
        return confirmer.check(problem, perf, solver, _refit_for(solver))
    return Checked(solver(problem), problem, None, ())


def _refit_for(solver: Solver) -> Refit | None:
    """Keeping counts that still fit is only right for an exact solver (milp.refit)."""
    return refit if solver is solve_milp else None


NOT_SIMULATED = (
    "not simulated: its estimate already costs no less than the plan that meets the SLO, and "
    "simulation only lowers estimates (the cost shown is a lower bound)"
)


@dataclass(frozen=True)
class _Comparison:
    """Builds each baseline against the checked plan `joint`."""

    inputs: PlanInputs
    confirmer: Confirmer
    simulate: bool
    joint: Outcome
    check_all: bool  # simulate every baseline, even one that cannot beat the plan

    @property
    def goodput(self) -> bool:
        return self.inputs.objective == "max_goodput"

    def outcome(
        self,
        name: str,
        search: SearchResult,
        first: Solution,
        solver: Solver,
        why: Callable[[CapacityProblem], str] | None = None,
    ) -> Outcome:
        """The baseline whose unchecked solution is `first`: checked in simulation, unless
        even unchecked it does not beat the plan (checks only lower rates, so they could
        only make it worse)."""
        estimate = outcome_of(
            name, self.inputs, Checked(first, search.problem, None, ()), search, self.confirmer, why
        )
        if not self.simulate or not estimate.feasible:
            return estimate
        if (
            not self.check_all
            and self.joint.meets_slo
            and not better(estimate, self.joint, self.goodput)
        ):
            return replace(estimate, notes=(*estimate.notes, NOT_SIMULATED))
        problem = search.problem
        again: Solver = lambda p: first if p is problem else solver(p)  # noqa: E731
        checked = self.confirmer.check(problem, search.perf, again, _refit_for(solver))
        return outcome_of(name, self.inputs, checked, search, self.confirmer, why)

    def single_type(self, search: SearchResult) -> Outcome:
        """The best one-type plan, types tried from the best unchecked solution on; once a
        checked one meets the SLO, a type whose unchecked solution does not beat it cannot
        after its checks either."""
        solved = []
        for gpu in self.inputs.gpus:
            own = single_type(search, gpu)
            solved.append((gpu, own, solve_milp(own.problem)))
        feasible = [(g, o, s) for g, o, s in solved if isinstance(s, Allocation)]
        if not feasible:
            reasons = "; ".join(f"single type ({g}): {s.reason}" for g, _, s in solved)
            return Outcome("single type", False, reasons, None, 0.0, (), (), None, ())
        feasible.sort(key=lambda item: (-item[2].served if self.goodput else 0.0, item[2].cost))
        best: Outcome | None = None
        for gpu, own, first in feasible:
            name = f"single type ({gpu})"
            if best is not None and best.meets_slo:
                unchecked = Checked(first, own.problem, None, ())
                estimate = outcome_of(name, self.inputs, unchecked, own, self.confirmer)
                if not better(estimate, best, self.goodput):
                    break
            outcome = self.outcome(name, own, first, solve_milp)
            if best is None or better(outcome, best, self.goodput):
                best = outcome
            if NOT_SIMULATED in outcome.notes and not self.check_all:
                break  # the rest are no better unchecked
        assert best is not None  # at least one type is feasible
        return best

    def all(self, search: SearchResult) -> tuple[Outcome, ...]:
        single = self.single_type(search)
        colocated = search.restricted(("colocated",))
        together = self.outcome(
            COLOCATED_BASELINE,
            colocated,
            solve_milp(colocated.problem),
            solve_milp,
            lambda problem: explain_infeasible(
                self.inputs, replace(colocated, problem=problem), roles=("colocated",)
            ),
        )
        apart = search.restricted(("prefill", "decode"))
        distserve = self.outcome(
            "DistServe-style (per phase)", apart, solve_distserve(apart.problem), solve_distserve
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
    check_baselines: bool = False,
) -> PlanReport:
    """The cheapest plan (or the most goodput within the budget) over prefill, decode and
    (unless `search.colocated` is false) colocated instances of every type, checked in
    simulation when `simulate`, with the baselines when `baselines`; a candidate baseline
    better than the checked plan (meets the SLO at less cost) is the plan. A baseline whose
    estimate cannot beat the checked plan is not simulated unless `check_baselines`.
    `search` from `search_all` with the same inputs but another rate saves the search."""
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
    main = outcome_of(
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
        comparison = _Comparison(inputs, confirmer, simulate, main, check_baselines)
        others = comparison.all(everything)
        seconds["baselines"] = time.perf_counter() - start
        main, chosen = choose(inputs, main, others)
    return PlanReport(inputs, main, others, search.rejected, seconds, chosen)


def choose(
    inputs: PlanInputs, joint: Outcome, baselines: tuple[Outcome, ...]
) -> tuple[Outcome, str]:
    """The plan and where it comes from: the joint search's checked plan, unless a candidate
    baseline is better (meets the SLO where it does not, or at less cost)."""
    goodput = inputs.objective == "max_goodput"
    eligible = [b for b in baselines if is_candidate(inputs, b)]
    best = max(eligible, key=lambda o: rank(o, goodput), default=None)
    if best is not None and better(best, joint, goodput):
        return _as_plan(best, joint), best.name
    return joint, JOINT_SEARCH
