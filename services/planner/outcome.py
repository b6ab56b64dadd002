"""What a plan or a baseline amounts to: its pools (with their loads, estimates and speeds),
its KV paths, its simulation, and how two of them compare."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.planner.capacity import colocated_tpot_quantile, prefill_queue, tpot_quantile
from services.planner.confirm import Checked, Confirmer
from services.planner.inputs import PlanInputs
from services.planner.milp import TIME_LIMIT_S
from services.planner.perf_model import PerfModel
from services.planner.problem import Allocation, CapacityProblem, Infeasible
from services.planner.search import SearchResult
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


def pools_of(
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


def outcome_of(
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
    notes = checked.notes
    if solution.gap > 0:
        notes = (
            *notes,
            f"the MILP stopped at its {TIME_LIMIT_S:g} s time limit {solution.gap:.2%} from its "
            "proven bound: the plan may cost up to that much more than the optimum",
        )
    return Outcome(
        name=name,
        feasible=True,
        reason="",
        cost_per_hour=solution.cost,
        served_rate=solution.served,
        pools=pools_of(inputs, checked.problem, search.perf, search.limits, solution),
        kv_paths=tuple((a, b, r) for (a, b), r in sorted(paths.items())),
        simulated=simulated,
        notes=notes,
    )


def rank(outcome: Outcome, goodput: bool) -> tuple[float, ...]:
    """Larger is better: feasible, then meeting the SLO in simulation, then (with max_goodput)
    more requests/s, then less cost."""
    if not outcome.feasible:
        return (0.0,)
    served = round(outcome.served_rate, 6) if goodput else 0.0  # solver noise is no gain
    return (1.0, float(outcome.meets_slo), served, -round(outcome.cost_per_hour or 0.0, 6))


def better(a: Outcome, b: Outcome, goodput: bool) -> bool:
    return rank(a, goodput) > rank(b, goodput)


def cost_per_million_tokens(inputs: PlanInputs, outcome: Outcome) -> float | None:
    """Per million tokens processed (prompt + output)."""
    if outcome.cost_per_hour is None or outcome.served_rate <= 0:
        return None
    tokens_per_hour = outcome.served_rate * (inputs.mix.mean_prompt + inputs.mix.mean_output) * 3600
    return outcome.cost_per_hour / tokens_per_hour * 1e6
