"""Colocated (aggregated) instances and P/D mixes in the joint search: the plan never costs
more than a baseline that meets the SLO, and each pool carries its instance speeds."""

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.planner.capacity import PhaseTargets, colocated_capacity, colocated_tpot_quantile
from services.planner.catalog import builtin_catalog
from services.planner.confirm import settings_of
from services.planner.deployment import Deployment, Pool, sample_percentile
from services.planner.inputs import PlanInputs, resolve
from services.planner.model_spec import builtin_model
from services.planner.outcome import Outcome, Simulated
from services.planner.perf_model import InstanceShape, PerfModel
from services.planner.planner import COLOCATED_BASELINE, JOINT_SEARCH, PlanReport, choose, plan
from services.planner.simulator import simulate
from services.planner.spec import load_spec, parse_spec
from services.planner.topology import topology
from services.planner.workload import Lengths, RequestMix
from tests.planner.instances import random_spec

EXAMPLES = Path(__file__).parents[2] / "services" / "planner" / "examples"


def _no_dearer_than_any_baseline(report: PlanReport) -> None:
    """The invariant: no reported baseline that meets the SLO (in simulation, when simulated)
    is cheaper than the plan, and the plan meets the SLO whenever one of them does."""
    plan_outcome = report.plan
    for baseline in report.baselines:
        if not baseline.meets_slo:
            continue
        assert plan_outcome.meets_slo, baseline.name
        assert plan_outcome.cost_per_hour is not None and baseline.cost_per_hour is not None
        assert plan_outcome.cost_per_hour <= baseline.cost_per_hour + 1e-9, baseline.name


def test_issue_13_the_colocated_option_is_in_the_search() -> None:
    """70B on four vendors at 2 req/s: P/D was recommended at 5.6/h while one colocated
    Gaudi 3 instance met the SLO in simulation at 4.8/h."""
    report = plan(resolve(load_spec(EXAMPLES / "four-vendors-70b.yaml")))
    colocated = next(b for b in report.baselines if b.name == COLOCATED_BASELINE)
    assert colocated.meets_slo and colocated.cost_per_hour == pytest.approx(4.8)
    assert report.plan.meets_slo
    assert report.plan.cost_per_hour is not None and report.plan.cost_per_hour <= 4.8 + 1e-9
    assert any(b.cost_per_hour == pytest.approx(5.6) for b in report.baselines)  # P/D's best
    _no_dearer_than_any_baseline(report)


def _small_spec(seed: int, requests: int) -> dict[str, Any]:
    spec = random_spec(random.Random(seed), types=(2, 3), max_gpus=12, tp=(1, 2))
    spec["search"] = {**spec["search"], "max_batch": 64}
    spec["simulation"] = {"requests": requests}
    return spec


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_the_plan_never_costs_more_than_a_baseline_that_meets_the_slo(seed: int) -> None:
    inputs = resolve(parse_spec(_small_spec(seed, requests=300)))
    estimated = plan(inputs, simulate=False)
    # on the estimates the joint search is optimal over a superset of every baseline's space
    assert estimated.chosen == JOINT_SEARCH
    _no_dearer_than_any_baseline(estimated)
    _no_dearer_than_any_baseline(plan(inputs, simulate=True))


def _outcome(name: str, cost: float, meets: bool) -> Outcome:
    simulated = Simulated(0.1, 0.01, 0.99 if meets else 0.5, meets, {})
    return Outcome(name, True, "", cost, 1.0, (), (), simulated, ())


def test_a_cheaper_baseline_that_meets_the_slo_is_the_plan(base_spec: dict[str, Any]) -> None:
    inputs = resolve(parse_spec(base_spec))
    joint = _outcome("plan", 10.0, True)
    cheaper = _outcome(COLOCATED_BASELINE, 8.0, True)
    dearer = _outcome("single type (h100-sxm)", 12.0, True)
    chosen, source = choose(inputs, joint, (dearer, cheaper))
    assert source == COLOCATED_BASELINE and chosen.cost_per_hour == 8.0
    assert chosen.name == "plan" and "baseline is the plan" in chosen.notes[-1]
    missing = _outcome(COLOCATED_BASELINE, 8.0, False)  # cheaper but misses the SLO
    assert choose(inputs, joint, (missing, dearer)) == (joint, JOINT_SEARCH)
    failing_joint = _outcome("plan", 10.0, False)
    assert choose(inputs, failing_joint, (dearer,))[1] == dearer.name
    pd_only = replace(inputs, search=inputs.search.model_copy(update={"colocated": False}))
    assert choose(pd_only, joint, (cheaper,)) == (joint, JOINT_SEARCH)  # not a candidate


def _mixed_8b(rate: float, requests: int) -> PlanInputs:
    inputs = resolve(load_spec(EXAMPLES / "mixed-8b.yaml")).with_rate(rate)
    return replace(inputs, simulation=inputs.simulation.model_copy(update={"requests": requests}))


def test_a_mixed_plan_is_confirmed_in_simulation_and_carries_speeds() -> None:
    inputs = _mixed_8b(100.0, requests=1500)
    report = plan(inputs, baselines=False)
    roles = {p.role for p in report.plan.pools}
    assert roles == {"prefill", "decode", "colocated"}  # some traffic each way
    assert report.plan.simulated is not None and report.plan.simulated.meets_slo
    assert set(report.plan.simulated.busy) == {"prefill", "decode", "colocated"}
    colocated_load = sum(p.load for p in report.plan.pools if p.role == "colocated")
    kv_load = sum(rate for _, _, rate in report.plan.kv_paths)
    assert colocated_load + kv_load == pytest.approx(100.0)

    pools = topology(report.plan, inputs.model.name)["pools"]
    assert {p["role"] for p in pools} == {"prefill", "decode", "both"}
    context = inputs.mix.mean_prompt + inputs.mix.mean_output / 2
    for entry, pool in zip(pools, report.plan.pools, strict=True):
        speed = entry["speed"]
        assert speed["requests_per_s"] == pytest.approx(pool.rate_per_instance, rel=1e-5)
        if entry["role"] == "decode":
            assert speed["prefill_tokens_per_s"] is None
        else:
            assert speed["prefill_tokens_per_s"] > 0
        if entry["role"] == "prefill":
            assert speed["decode_step_s"] is None and speed["batch"] is None
            continue
        perf = PerfModel(
            inputs.model,
            InstanceShape(inputs.gpus[pool.gpu], pool.tp, pool.pp),
            inputs.link_gbps[(pool.gpu, pool.gpu)],
        )
        batch = speed["batch"]
        assert batch >= 1
        step = float(perf.decode_round(batch, batch * context))
        assert speed["decode_step_s"] == pytest.approx(step, rel=1e-4)
        assert speed["decode_tokens_per_s"] == pytest.approx(batch / step, rel=1e-4)


PERF = PerfModel(builtin_model("llama-3-8b"), InstanceShape(builtin_catalog()["l40s"], 1, 1), 400)
MIX = RequestMix(
    rate=None,
    prompt=Lengths("lognormal", 1024, cv=0.5, maximum=8192),
    output=Lengths("lognormal", 256, cv=0.5, maximum=2048),
)
TARGETS = PhaseTargets(
    ttft_s=0.5, tpot_s=0.03, level=0.9, max_batch=64, max_prefill_tokens=8192,
    memory_utilisation=0.9,
)  # fmt: skip


def _simulated_p90(rate: float) -> tuple[float, float]:
    deployment = Deployment((Pool("colocated", PERF, 1),), (), {("l40s", "l40s"): 400.0})
    spec = {
        "model": "llama-3-8b",
        "inventory": [{"gpu": "l40s", "count": 1, "price_per_hour": 1.0}],
        "network": {"inter_pool_gbps": 400},
        "workload": {"rate": rate, "prompt_tokens": {"mean": 1024}, "output_tokens": {"mean": 256}},
        "slo": {"ttft_s": 0.5, "tpot_s": 0.03},
        "search": {"max_batch": 64},
    }
    result = simulate(deployment, MIX.with_rate(rate), settings_of(resolve(parse_spec(spec)), 2048))
    return sample_percentile(result.ttft, 90), sample_percentile(result.tpot, 90)


def test_the_colocated_estimate_is_honest_about_prefill_stalls() -> None:
    """Prefills stall the decode batch: the estimate holds in simulation a little below it
    and fails above it, and its TPOT quantile is the target at the estimated rate."""
    capacity = colocated_capacity(PERF, MIX, TARGETS)
    assert capacity.rate > 0
    assert colocated_tpot_quantile(PERF, MIX, capacity.rate, 0.9, 64) <= TARGETS.tpot_s * 1.001
    ttft, tpot = _simulated_p90(0.85 * capacity.rate)
    assert ttft <= TARGETS.ttft_s and tpot <= TARGETS.tpot_s
    ttft, tpot = _simulated_p90(1.3 * capacity.rate)
    assert ttft > TARGETS.ttft_s or tpot > TARGETS.tpot_s
    # stalls grow with the prefill load: TPOT rises with the rate at a fixed batch bound
    quantiles = [colocated_tpot_quantile(PERF, MIX, r, 0.9, 64) for r in (0.2, 0.5, 1.0)]
    assert quantiles == sorted(quantiles) and np.isfinite(quantiles).all()
