"""Check plans in the simulator before they are reported.

Step 1: each configuration a solution uses is simulated alone at the rate the queueing estimate
claims; if it misses its phase target there, the highest rate it does meet (bisection in
simulation) replaces the estimate and the problem is solved again. Step 2: the whole deployment
is simulated; while it misses the SLO, the rates of the phase that falls short are lowered by
DERATE and the problem is solved again (at most MAX_DERATE_ROUNDS times). Rates are only ever
lowered: a simulation that sustains more than the estimate leaves the estimate in place.
A phase simulation stops as soon as enough requests have missed that it cannot pass (its
result is a miss either way); whole deployments are simulated once per run (cached), so a
baseline that equals the plan is not simulated again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from services.planner.deployment import (
    Deployment,
    Pool,
    Route,
    Settings,
    SimResult,
    StopRule,
    allowed_misses,
    sample_percentile,
)
from services.planner.inputs import PlanInputs
from services.planner.perf_model import PerfModel
from services.planner.problem import Allocation, CapacityProblem, Config, Infeasible, Solution
from services.planner.simulator import first_measured, simulate

Solver = Callable[[CapacityProblem], Solution]
Refit = Callable[[CapacityProblem, tuple[int, ...]], Allocation | None]

BISECTION_SIMULATIONS = 5
PHASE_REQUESTS = 1500  # per single-instance simulation (at least 8 full batches)
MAX_SOLVE_ROUNDS = 8
MAX_DERATE_ROUNDS = 4
DERATE = 0.9
WAIT_SHARE = 0.25  # memory waits longer than this share of the TTFT target blame decode


def settings_of(inputs: PlanInputs, requests: int | None = None) -> Settings:
    sim, search = inputs.simulation, inputs.search
    count = requests if requests is not None else sim.requests
    warmup = max(sim.warmup_fraction, min(0.5, 2 * search.max_batch / count))
    return Settings(
        requests=count,
        seed=sim.seed,
        warmup_fraction=warmup,
        max_batch=search.max_batch,
        max_prefill_tokens=search.max_prefill_tokens,
        memory_utilisation=search.gpu_memory_utilisation,
    )


def deployment_of(
    problem: CapacityProblem,
    perf: tuple[PerfModel, ...],
    allocation: Allocation,
    link_gbps: Mapping[tuple[str, str], float],
) -> Deployment:
    pools: list[Pool] = []
    pool_of: dict[int, int] = {}
    for i, (n, config) in enumerate(zip(allocation.counts, problem.configs, strict=True)):
        if n:
            pool_of[i] = len(pools)
            pools.append(Pool(config.role, perf[i], n))
    routes = [Route(pool_of[i], b, rate) for (i, b), rate in allocation.flows.items()]
    colocated_share = allocation.served - sum(allocation.flows.values())
    if routes and colocated_share > 1e-9 and any(p.role == "colocated" for p in pools):
        routes.append(Route.to_colocated(colocated_share))  # a mix: the rest is colocated
    return Deployment(tuple(pools), tuple(routes), link_gbps)


def _signature(deployment: Deployment, rate: float) -> tuple[object, ...]:
    pools = tuple(
        (p.role, p.perf.shape.gpu.name, p.perf.shape.tp, p.perf.shape.pp, p.instances)
        for p in deployment.pools
    )
    routes = tuple(
        (r.prefill_pool, r.decode_gpu, round(r.share, 9), r.colocated) for r in deployment.routes
    )
    return rate, pools, routes


@dataclass(frozen=True)
class Checked:
    """A solution after both steps, with the simulation of the last one and what changed."""

    solution: Solution
    problem: CapacityProblem
    simulation: SimResult | None
    notes: tuple[str, ...]


class Confirmer:
    """Simulation checks shared by every strategy of one planning run (results are cached)."""

    def __init__(self, inputs: PlanInputs) -> None:
        self.inputs = inputs
        self._sustained: dict[tuple[str, str, int, int, float], float] = {}
        self._simulated: dict[tuple[object, ...], SimResult] = {}

    # step 1 ----------------------------------------------------------------------------
    def _phase_ok(self, config: Config, perf: PerfModel, rate: float, destination: str) -> bool:
        inputs = self.inputs
        if config.role == "prefill":
            routes = (Route(0, destination, 1.0),)
        elif config.role == "decode":
            routes = (Route(None, config.gpu, 1.0),)
        else:
            routes = ()
        deployment = Deployment((Pool(config.role, perf, 1),), routes, inputs.link_gbps)
        requests = max(PHASE_REQUESTS, 8 * inputs.search.max_batch)
        settings = settings_of(inputs, requests)
        level = 100 * inputs.level
        start = first_measured(settings)
        allowed = allowed_misses(settings.requests - start, level)
        stop = StopRule(
            first_measured=start,
            ttft_s=inputs.slo.ttft_s,
            tpot_s=inputs.slo.tpot_s,
            ttft_misses=allowed if config.role != "decode" else float("inf"),
            tpot_misses=allowed if config.role != "prefill" else float("inf"),
        )
        result = simulate(deployment, inputs.mix.with_rate(rate), settings, stop)
        ttft_ok = sample_percentile(result.ttft, level) <= inputs.slo.ttft_s
        tpot_ok = sample_percentile(result.tpot, level) <= inputs.slo.tpot_s
        return {"prefill": ttft_ok, "decode": tpot_ok}.get(config.role, ttft_ok and tpot_ok)

    def sustained(self, config: Config, perf: PerfModel, destination: str) -> float:
        """The highest rate (at most the estimate) at which the simulated instance meets its
        phase target; prefill is timed with the KV path to `destination`."""
        claimed = config.rate_to[destination] if config.role == "prefill" else config.rate
        bandwidth = (
            self.inputs.link_gbps[(config.gpu, destination)] if config.role == "prefill" else 0.0
        )
        key = (config.role, config.gpu, config.tp, config.pp, bandwidth)
        if key not in self._sustained:
            if self._phase_ok(config, perf, claimed, destination):
                self._sustained[key] = claimed
            else:
                low, high = 0.0, claimed
                for _ in range(BISECTION_SIMULATIONS):
                    middle = (low + high) / 2
                    if self._phase_ok(config, perf, middle, destination):
                        low = middle
                    else:
                        high = middle
                self._sustained[key] = low
        return self._sustained[key]

    def _confirm_used(
        self,
        problem: CapacityProblem,
        perf: tuple[PerfModel, ...],
        allocation: Allocation,
        checked: set[int],
        notes: list[str],
    ) -> CapacityProblem:
        configs = list(problem.configs)
        for i, n in enumerate(allocation.counts):
            if not n or i in checked:
                continue
            checked.add(i)
            config = configs[i]
            if config.role == "prefill":
                used = [b for (j, b) in allocation.flows if j == i] or [config.gpu]
                destination = min(used, key=lambda b: self.inputs.link_gbps[(config.gpu, b)])
                claimed = config.rate_to[destination]
            else:
                destination, claimed = config.gpu, config.rate
            sustained = self.sustained(config, perf[i], destination)
            if sustained < claimed * (1 - 1e-6):
                notes.append(
                    f"{config.label()}: simulation sustains {sustained:.3g} req/s per instance; "
                    f"the queueing estimate said {claimed:.3g}"
                )
                configs[i] = _scaled(config, sustained / claimed)
        return replace(problem, configs=tuple(configs))

    # both steps ------------------------------------------------------------------------
    def check(
        self,
        problem: CapacityProblem,
        perf: tuple[PerfModel, ...],
        solver: Solver,
        refit: Refit | None = None,
    ) -> Checked:
        """Both steps. With `refit` (for an exact solver), a solution whose counts still fit
        after its rates were lowered is kept, with new flows, rather than solved again."""
        notes: list[str] = []
        checked: set[int] = set()
        derates = 0
        kept: Allocation | None = None
        for _ in range(MAX_SOLVE_ROUNDS + MAX_DERATE_ROUNDS):
            solution = kept if kept is not None else solver(problem)
            kept = None
            if isinstance(solution, Infeasible):
                return Checked(solution, problem, None, tuple(notes))
            confirmed = self._confirm_used(problem, perf, solution, checked, notes)
            if any(a is not b for a, b in zip(confirmed.configs, problem.configs, strict=True)):
                problem = confirmed
                kept = refit(problem, solution.counts) if refit is not None else None
                if kept is not None:
                    kept = replace(kept, gap=solution.gap)  # as optimal as the solution was
                continue
            simulation = self.simulate(problem, perf, solution)
            short = self.short_phases(simulation)
            if not short or derates == MAX_DERATE_ROUNDS:
                return Checked(solution, problem, simulation, tuple(notes))
            derates += 1
            notes.append(
                f"whole-deployment simulation missed the SLO ({', '.join(sorted(short))} short); "
                f"their rates lowered to {DERATE:.0%} and re-solved"
            )
            configs = tuple(
                _scaled(c, DERATE) if n and c.role in short else c
                for n, c in zip(solution.counts, problem.configs, strict=True)
            )
            problem = replace(problem, configs=configs)
            # the same counts with lowered rates only fit where they had slack: then they
            # would simulate the same way, so they must be solved again

        notes.append(f"stopped re-solving after {MAX_SOLVE_ROUNDS + MAX_DERATE_ROUNDS} rounds")
        return Checked(solution, problem, self.simulate(problem, perf, solution), tuple(notes))

    def simulate(
        self, problem: CapacityProblem, perf: tuple[PerfModel, ...], allocation: Allocation
    ) -> SimResult:
        """The deployment at the demand (or, maximising goodput, at the rate it serves)."""
        rate = problem.demand if problem.demand is not None else allocation.served
        inputs = self.inputs.with_rate(rate)
        deployment = deployment_of(problem, perf, allocation, inputs.link_gbps)
        key = _signature(deployment, rate)
        if key not in self._simulated:
            self._simulated[key] = simulate(deployment, inputs.mix, settings_of(inputs))
        return self._simulated[key]

    def meets_slo(self, result: SimResult) -> bool:
        slo = self.inputs.slo
        ttft, tpot = result.quantiles(slo.percentile)
        return (
            ttft <= slo.ttft_s
            and tpot <= slo.tpot_s
            and result.attainment(slo.ttft_s, slo.tpot_s) >= slo.attainment
        )

    def short_phases(self, result: SimResult) -> set[str]:
        """Roles whose rates to lower: none when the deployment meets the SLO. In a mix, the
        colocated requests and the disaggregated ones are judged apart."""
        if self.meets_slo(result):
            return set()
        together = result.served_colocated()
        short = set()
        if together.any() and not self.meets_slo(result.subset(together)):
            short.add("colocated")
        if not together.all():
            apart = result.subset(~together)
            if not short or not self.meets_slo(apart):
                short |= self._short_disaggregated(apart)
        return short

    def _short_disaggregated(self, result: SimResult) -> set[str]:
        slo, level = self.inputs.slo, self.inputs.level
        ttft_share = float(np.mean(result.ttft <= slo.ttft_s))
        tpot_share = float(np.mean(result.tpot <= slo.tpot_s))
        short = set()
        if ttft_share < level or ttft_share <= tpot_share:
            short.add("prefill")
            if sample_percentile(result.wait, 100 * level) > WAIT_SHARE * slo.ttft_s:
                short.add("decode")  # requests wait for decode memory
        if tpot_share < level or tpot_share < ttft_share:
            short.add("decode")
        return short


def _scaled(config: Config, factor: float) -> Config:
    if config.role == "prefill":
        return replace(config, rate_to={b: r * factor for b, r in config.rate_to.items()})
    return replace(config, rate=config.rate * factor)
