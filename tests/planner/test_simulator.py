import numpy as np
import pytest

from services.planner.catalog import builtin_catalog
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
from services.planner.model_spec import builtin_model
from services.planner.perf_model import InstanceShape, PerfModel, transfer_tail
from services.planner.simulator import first_measured, simulate
from services.planner.workload import Lengths, RequestMix

A100 = builtin_catalog()["a100-80gb"]
MODEL = builtin_model("llama-3-8b")
PERF = PerfModel(MODEL, InstanceShape(A100, 1, 1), 400)
LINKS = {("a100-80gb", "a100-80gb"): 100.0}
SETTINGS = Settings(
    requests=600,
    seed=3,
    warmup_fraction=0.1,
    max_batch=64,
    max_prefill_tokens=8192,
    memory_utilisation=0.9,
)


def _mix(rate: float, prompt: Lengths | None = None, output: Lengths | None = None) -> RequestMix:
    return RequestMix(
        rate, prompt or Lengths("exponential", 1024, maximum=4096), output or Lengths("fixed", 128)
    )


def _disaggregated(prefill: int = 1, decode: int = 1) -> Deployment:
    pools = (Pool("prefill", PERF, prefill), Pool("decode", PERF, decode))
    return Deployment(pools, (Route(0, "a100-80gb", 1.0),), LINKS)


def test_attainment_falls_as_the_rate_rises() -> None:
    attained = [
        simulate(_disaggregated(), _mix(rate), SETTINGS).attainment(ttft_s=0.5, tpot_s=0.04)
        for rate in (0.5, 2, 4, 6, 8, 12)
    ]
    assert attained[0] > 0.95 and attained[-1] < 0.5
    assert all(
        later <= earlier + 0.01 for earlier, later in zip(attained, attained[1:], strict=False)
    )


def test_a_lone_decode_request_takes_the_sum_of_its_rounds() -> None:
    prompt, output = 500, 40
    mix = _mix(1e-4, Lengths("fixed", prompt), Lengths("fixed", output))
    alone = Deployment((Pool("decode", PERF, 1),), (Route(None, "a100-80gb", 1.0),), LINKS)
    result = simulate(alone, mix, Settings(100, 0, 0.0, 64, 8192, 0.9))
    rounds = [float(PERF.decode_round(1, prompt + 1 + j)) for j in range(output - 1)]
    assert result.tpot == pytest.approx(sum(rounds) / (output - 1), rel=1e-9)
    assert np.all(result.ttft == 0)


def test_a_lone_prefill_takes_its_latency_plus_the_exposed_transfer() -> None:
    prompt = 2000
    mix = _mix(1e-4, Lengths("fixed", prompt), Lengths("fixed", 10))
    alone = Deployment(
        (Pool("prefill", PERF, 1),),
        (Route(0, "a100-80gb", 1.0),),
        {("a100-80gb", "a100-80gb"): 10.0},
    )
    result = simulate(alone, mix, Settings(100, 0, 0.0, 64, 8192, 0.9))
    latency = float(PERF.prefill_latency(prompt, prompt**2, 1))
    tail = float(transfer_tail(prompt * MODEL.kv_bytes_per_token, latency, MODEL.num_layers, 10.0))
    assert result.ttft == pytest.approx(latency + tail, rel=1e-9)


def test_decode_memory_makes_requests_wait() -> None:
    small = Settings(600, 3, 0.1, 64, 8192, memory_utilisation=0.215)
    assert 2000 < PERF.kv_capacity_tokens(0.215, 8192) < 6000  # a few requests' worth
    mix = _mix(4.0, Lengths("exponential", 1024, maximum=2048))  # every request fits alone
    result = simulate(_disaggregated(), mix, small)
    roomy = simulate(_disaggregated(), mix, SETTINGS)
    assert np.isfinite(result.ttft).all()
    assert np.percentile(result.wait, 90) > 0.1
    assert np.percentile(roomy.wait, 90) == 0.0


def test_a_request_larger_than_decode_memory_is_refused_not_stuck() -> None:
    tiny = Settings(200, 3, 0.0, 64, 8192, memory_utilisation=0.215)
    mix = _mix(1.0, Lengths("fixed", 8000), Lengths("fixed", 100))
    result = simulate(_disaggregated(), mix, tiny)
    assert np.isinf(result.ttft).all() and np.isinf(result.tpot).all()


def test_colocated_prefills_stall_decode() -> None:
    colocated = Deployment((Pool("colocated", PERF, 1),), (), LINKS)
    split = _disaggregated()
    mix = _mix(3.0)
    together = simulate(colocated, mix, SETTINGS)
    apart = simulate(split, mix, SETTINGS)
    assert together.quantiles(90)[1] > apart.quantiles(90)[1]  # TPOT suffers when colocated
    assert set(together.busy) == {"colocated"} and set(apart.busy) == {"prefill", "decode"}


def test_same_seed_same_result() -> None:
    first = simulate(_disaggregated(), _mix(5.0), SETTINGS)
    second = simulate(_disaggregated(), _mix(5.0), SETTINGS)
    assert np.array_equal(first.ttft, second.ttft) and np.array_equal(first.tpot, second.tpot)


def test_a_mixed_deployment_sends_the_colocated_share_to_colocated_instances() -> None:
    pools = (Pool("prefill", PERF, 1), Pool("decode", PERF, 1), Pool("colocated", PERF, 2))
    routes = (Route(0, "a100-80gb", 3.0), Route.to_colocated(1.0))
    mixed = Deployment(pools, routes, LINKS)
    result = simulate(mixed, _mix(4.0), SETTINGS)
    together = result.served_colocated()
    assert abs(together.mean() - 0.25) < 0.05  # the colocated route's share of 4 req/s
    assert set(result.busy) == {"prefill", "decode", "colocated"}
    assert np.isfinite(result.ttft).all() and np.isfinite(result.tpot).all()
    apart = result.subset(~together)
    assert len(apart.ttft) + len(result.subset(together).ttft) == len(result.ttft)


def test_allowed_misses_matches_the_sample_percentile() -> None:
    rng = np.random.default_rng(0)
    for count in (1, 2, 9, 10, 11, 100, 1351):
        for percentile in (50.0, 90.0, 94.87, 99.0):
            allowed = allowed_misses(count, percentile)
            values = rng.permutation(np.r_[np.zeros(count - allowed), np.full(allowed, 2.0)])
            assert sample_percentile(values, percentile) <= 1.0
            if allowed < count:
                values[np.argmin(values)] = 2.0  # one more miss fails the percentile
                assert sample_percentile(values, percentile) > 1.0


@pytest.mark.parametrize("rate", [2.0, 12.0])
def test_a_stop_rule_gives_the_full_runs_verdict(rate: float) -> None:
    """Stopped once more requests missed than the percentile allows: the same verdict as
    the whole run, reached early only when it is a miss."""
    deployment = _disaggregated()
    full = simulate(deployment, _mix(rate), SETTINGS)
    start = first_measured(SETTINGS)
    allowed = allowed_misses(SETTINGS.requests - start, 90)
    stop = StopRule(start, ttft_s=0.5, tpot_s=0.04, ttft_misses=allowed, tpot_misses=allowed)
    short = simulate(deployment, _mix(rate), SETTINGS, stop)

    def verdict(result: SimResult) -> bool:
        ttft, tpot = result.quantiles(90)
        return ttft <= 0.5 and tpot <= 0.04

    assert verdict(short) == verdict(full)
    assert short.stopped_early == (not verdict(full))
    if not short.stopped_early:
        assert np.array_equal(short.ttft, full.ttft) and np.array_equal(short.tpot, full.tpot)
