from dataclasses import replace

import pytest

from services.planner.capacity import (
    PhaseTargets,
    decode_capacity,
    prefill_capacity,
    prefill_queue,
    tpot_quantile,
)
from services.planner.catalog import builtin_catalog
from services.planner.model_spec import builtin_model
from services.planner.perf_model import InstanceShape, PerfModel
from services.planner.workload import Lengths, RequestMix

MIX = RequestMix(
    rate=None, prompt=Lengths("exponential", 1024, maximum=8192), output=Lengths("fixed", 200)
)
TARGETS = PhaseTargets(
    ttft_s=1.0,
    tpot_s=0.05,
    level=0.9,
    max_batch=256,
    max_prefill_tokens=8192,
    memory_utilisation=0.9,
)
PERF = PerfModel(
    builtin_model("llama-3-8b"), InstanceShape(builtin_catalog()["a100-80gb"], 1, 1), 400
)


def test_prefill_capacity_sits_where_the_ttft_quantile_meets_the_target() -> None:
    capacity = prefill_capacity(PERF, MIX, TARGETS, 400)
    queue = prefill_queue(PERF, MIX, 400)
    assert capacity.rate > 0
    assert queue.quantile(capacity.rate, 0.9) == pytest.approx(1.0, rel=1e-3)
    assert queue.quantile(capacity.rate * 1.05, 0.9) > 1.0
    assert queue.quantile(1.01 / queue.mean_service, 0.9) == float("inf")


def test_looser_slos_allow_more_load() -> None:
    tight = prefill_capacity(PERF, MIX, replace(TARGETS, ttft_s=0.5), 400).rate
    loose = prefill_capacity(PERF, MIX, replace(TARGETS, ttft_s=2.0), 400).rate
    assert 0 < tight < loose
    assert (
        decode_capacity(PERF, MIX, replace(TARGETS, tpot_s=0.03)).rate
        < decode_capacity(PERF, MIX, TARGETS).rate
    )


def test_decode_capacity_meets_the_tpot_target_at_its_rate() -> None:
    capacity = decode_capacity(PERF, MIX, TARGETS)
    assert capacity.rate > 0
    assert tpot_quantile(PERF, MIX, capacity.rate, 0.9, 256) <= 0.05 * 1.001


def test_impossible_targets_give_zero_with_the_zero_load_latency() -> None:
    prefill = prefill_capacity(PERF, MIX, replace(TARGETS, ttft_s=0.001), 400)
    assert prefill.rate == 0 and prefill.unloaded_s is not None and prefill.unloaded_s > 0.001
    assert "TTFT at zero load" in prefill.reason
    decode = decode_capacity(PERF, MIX, replace(TARGETS, tpot_s=0.0001))
    assert decode.rate == 0 and "TPOT" in decode.reason


def test_a_slow_link_lowers_prefill_capacity() -> None:
    fast = prefill_capacity(PERF, MIX, TARGETS, 400).rate
    slow = prefill_capacity(PERF, MIX, TARGETS, 2).rate
    assert slow < fast
