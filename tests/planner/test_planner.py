from typing import Any

import pytest

from services.planner.inputs import resolve
from services.planner.planner import NOT_SIMULATED, PlanReport, plan
from services.planner.spec import parse_spec


def _plan(spec: dict[str, Any], simulate: bool = False) -> PlanReport:
    return plan(resolve(parse_spec(spec)), simulate=simulate)


def test_plan_is_no_dearer_than_the_disaggregated_baselines(base_spec: dict[str, Any]) -> None:
    base_spec["search"] = {"colocated": False}  # P/D pools only (colocated ones are cheaper here)
    report = _plan(base_spec)
    assert report.plan.feasible and report.plan.cost_per_hour
    names = [b.name for b in report.baselines]
    assert names[1:] == ["colocated (no P/D)", "DistServe-style (per phase)"]
    assert names[0].startswith("single type")
    for baseline in (report.baselines[0], report.baselines[2]):  # restrictions of the same problem
        if baseline.feasible:
            assert report.plan.cost_per_hour <= baseline.cost_per_hour + 1e-9
    assert report.plan.served_rate == pytest.approx(5.0)
    assert {p.role for p in report.plan.pools} == {"prefill", "decode"}


def test_every_reported_plan_was_simulated(base_spec: dict[str, Any]) -> None:
    base_spec["model"] = "llama-3-8b"
    base_spec["workload"] = {
        "rate": 4.0,
        "prompt_tokens": {"mean": 512},
        "output_tokens": {"mean": 64},
    }
    base_spec["simulation"] = {"requests": 400}
    inputs = resolve(parse_spec(base_spec))
    report = plan(inputs, simulate=True, check_baselines=True)
    for outcome in (report.plan, *report.baselines):
        if outcome.feasible:
            assert outcome.simulated is not None, outcome.name
            assert 0 <= outcome.simulated.attainment <= 1
    assert report.plan.simulated is not None and report.plan.simulated.meets_slo
    # by default a baseline whose estimate cannot beat the plan is left unsimulated, said so
    default = plan(inputs, simulate=True)
    assert default.plan.cost_per_hour == report.plan.cost_per_hour
    for outcome in default.baselines:
        if outcome.feasible and outcome.simulated is None:
            assert NOT_SIMULATED in outcome.notes
            assert outcome.cost_per_hour >= default.plan.cost_per_hour


def test_a_model_that_fits_no_gpu(base_spec: dict[str, Any]) -> None:
    base_spec["inventory"] = [{"gpu": "l4", "count": 2, "price_per_hour": 0.8}]
    report = _plan(base_spec)
    assert not report.plan.feasible
    assert "model llama-3-70b (141.1 GB of weights) fits on no instance shape" in report.plan.reason
    assert "2 x l4 (24 GB)" in report.plan.reason
    assert "l4 tp=2 pp=1: weights and activations take" in report.plan.reason


def test_an_slo_no_configuration_meets(base_spec: dict[str, Any]) -> None:
    base_spec["slo"]["ttft_s"] = 0.01
    report = _plan(base_spec)
    assert not report.plan.feasible
    reason = report.plan.reason
    assert "no prefill configuration meets TTFT <= 0.01 s for 94.9% of requests" in reason
    assert "TTFT at zero load is" in reason  # and the closest candidates are quoted


def test_a_demand_beyond_the_inventory(base_spec: dict[str, Any]) -> None:
    base_spec["workload"]["rate"] = 500.0
    report = _plan(base_spec)
    assert not report.plan.feasible
    assert "the inventory sustains at most" in report.plan.reason
    assert "the workload asks for 500 req/s" in report.plan.reason


def test_cross_pool_kv_stays_within_the_link(base_spec: dict[str, Any]) -> None:
    base_spec["inventory"] = [
        {"gpu": "h100-sxm", "count": 8, "price_per_hour": 4.0},
        {"gpu": "l40s", "count": 16, "price_per_hour": 0.5},
    ]
    base_spec["network"] = {"inter_pool_gbps": 1, "intra_pool_gbps": 400}
    base_spec["workload"]["rate"] = 3.0
    narrow = _plan(base_spec)
    base_spec["network"]["inter_pool_gbps"] = 400
    wide = _plan(base_spec)
    assert wide.plan.feasible and narrow.plan.feasible
    assert wide.plan.cost_per_hour <= narrow.plan.cost_per_hour
    for source, destination, rate in narrow.plan.kv_paths:
        if source != destination:
            assert rate <= 1e9 / 8 * 0.8 / (2048 * 327_680) + 1e-9  # within the 1 Gbit/s link


def test_max_goodput_spends_within_the_budget(base_spec: dict[str, Any]) -> None:
    base_spec["objective"] = "max_goodput"
    base_spec["budget_per_hour"] = 40.0
    report = _plan(base_spec)
    assert report.plan.feasible
    assert report.plan.cost_per_hour <= 40.0 and report.plan.served_rate > 0


def test_a_link_that_limits_the_demand_is_named(base_spec: dict[str, Any]) -> None:
    base_spec["model"] = "llama-3-8b"
    base_spec["inventory"] = [
        {"gpu": "h100-sxm", "count": 2, "price_per_hour": 4.0},
        {"gpu": "l4", "count": 8, "price_per_hour": 0.8},
    ]
    base_spec["network"] = {"inter_pool_gbps": 5}
    base_spec["search"] = {"colocated": False}  # colocated instances send no KV over links
    base_spec["workload"]["rate"] = 20.0
    mixed = _plan(base_spec)
    assert mixed.plan.feasible
    assert any(a != b for a, b, _ in mixed.plan.kv_paths)  # the optimum crosses vendors
    base_spec["workload"]["rate"] = 30.0
    reason = _plan(base_spec).plan.reason
    assert "the KV links between pools are the limit (with unlimited links:" in reason
