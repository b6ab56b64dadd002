import pytest

from services.planner.catalog import builtin_catalog
from services.planner.model_spec import builtin_model
from services.planner.perf_model import InstanceShape, PerfModel, transfer_tail

H100 = builtin_catalog()["h100-sxm"]
LLAMA_8B = builtin_model("llama-3-8b")
LLAMA_70B = builtin_model("llama-3-70b")


def _perf(gpu=H100, model=LLAMA_8B, tp: int = 1, pp: int = 1) -> PerfModel:
    return PerfModel(model, InstanceShape(gpu, tp, pp), network_gbps=400)


def test_single_sequence_decode_reads_the_weights_once() -> None:
    perf = _perf()
    eff = H100.efficiency
    weights_s = LLAMA_8B.weight_bytes / (H100.hbm_gbps * 1e9 * eff.memory)
    overhead = LLAMA_8B.num_layers * eff.layer_overhead_s
    # embeddings are not read by a decode step except one row: lm_head and layers only
    layer_and_head = (LLAMA_8B.weight_bytes - LLAMA_8B.embedding_params * 2) / (
        H100.hbm_gbps * 1e9 * eff.memory
    )
    step = float(perf.decode_round(1, 1))
    assert layer_and_head + overhead <= step <= weights_s + overhead + 1e-4


def test_long_prefill_is_compute_bound() -> None:
    perf = _perf()
    tokens = 8192
    gemm_flops = 2 * LLAMA_8B.num_layers * LLAMA_8B.layer_params * tokens
    compute_s = gemm_flops / (H100.dense_flops * H100.efficiency.compute)
    latency = float(perf.prefill_latency(tokens, tokens**2, 1))
    assert compute_s < latency < 1.5 * compute_s


def test_tensor_parallelism_shortens_steps_but_costs_all_reduces() -> None:
    one, four = _perf(model=LLAMA_70B, tp=2), _perf(model=LLAMA_70B, tp=8)
    assert float(four.decode_round(32, 32 * 2048)) < float(one.decode_round(32, 32 * 2048))
    assert float(four.prefill_latency(2048, 2048**2, 1)) < float(
        one.prefill_latency(2048, 2048**2, 1)
    )
    assert float(four._allreduce(2048.0)) > 0 == float(_perf()._allreduce(2048.0))


def test_pipeline_parallel_prefill_frees_the_first_stage_early() -> None:
    perf = _perf(model=LLAMA_70B, tp=2, pp=4)
    stage = float(perf.prefill_stage_time(2048, 2048**2, 1))
    latency = float(perf.prefill_latency(2048, 2048**2, 1))
    assert 3.5 * stage < latency < 4.5 * stage


def test_memory_fit() -> None:
    assert _perf(model=LLAMA_70B, tp=1).kv_capacity_tokens(0.9, 8192) == 0  # 141 GB on 80 GB
    two, four = _perf(model=LLAMA_70B, tp=2), _perf(model=LLAMA_70B, tp=4)
    assert 0 < two.kv_capacity_tokens(0.9, 8192) < four.kv_capacity_tokens(0.9, 8192)


def test_transfer_tail_hides_behind_compute_unless_the_link_is_slower() -> None:
    kv, layers = 1e9, 80  # 1 GB of KV = 8 Gbit
    fast = transfer_tail(kv, latency=1.0, layers=layers, link_gbps=400)  # 0.02 s in all
    assert fast == pytest.approx(0.02 / layers)
    slow = transfer_tail(kv, latency=1.0, layers=layers, link_gbps=4)  # 2 s in all
    assert slow == pytest.approx(2.0 - 1.0 * (layers - 1) / layers)
