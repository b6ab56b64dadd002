import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from services.planner.errors import PlannerError
from services.planner.inputs import resolve
from services.planner.spec import load_spec, parse_spec


def _error(spec: dict[str, Any]) -> str:
    with pytest.raises(PlannerError) as caught:
        resolve(parse_spec(spec))
    return str(caught.value)


def test_negative_rate(base_spec: dict[str, Any]) -> None:
    base_spec["workload"]["rate"] = -1
    assert "workload.rate: Input should be greater than 0 (got -1)" in _error(base_spec)


def test_empty_inventory(base_spec: dict[str, Any]) -> None:
    base_spec["inventory"] = []
    assert "inventory: is empty: list at least one GPU type" in _error(base_spec)


def test_unknown_gpu_suggests_the_closest_name(base_spec: dict[str, Any]) -> None:
    base_spec["inventory"][1]["gpu"] = "mi300"
    message = _error(base_spec)
    assert "inventory[1].gpu: unknown GPU 'mi300'; did you mean 'mi300x'?" in message
    assert "h100-sxm" in message  # the known names are listed


def test_other_field_errors_name_their_place(base_spec: dict[str, Any]) -> None:
    base_spec["inventory"][0]["count"] = 0
    base_spec["slo"]["attainment"] = 1.5
    message = _error(base_spec)
    assert "inventory.0.count: Input should be greater than or equal to 1 (got 0)" in message
    assert "slo.attainment: Input should be less than or equal to 1 (got 1.5)" in message


def test_cross_field_rules(base_spec: dict[str, Any]) -> None:
    goodput = {**base_spec, "objective": "max_goodput"}
    assert "max_goodput needs budget_per_hour" in _error(goodput)
    twice = {**base_spec, "inventory": base_spec["inventory"] + [base_spec["inventory"][0]]}
    assert "inventory lists h100-sxm more than once" in _error(twice)
    base_spec["workload"]["output_tokens"] = {"mean": 1}
    assert "one output token needs no decode" in _error(base_spec)


def test_network_links_must_name_inventory_types(base_spec: dict[str, Any]) -> None:
    base_spec["network"]["links"] = [{"from": "h100-sxm", "to": "l4", "gbps": 10}]
    assert "network.links[0].to: 'l4' is not in the inventory" in _error(base_spec)


def test_new_gpu_types_need_every_figure(base_spec: dict[str, Any]) -> None:
    base_spec["gpus"] = [{"name": "my-accel", "tflops_bf16": 100}]
    assert "gpus[0] (my-accel): a new GPU type needs vendor" in _error(base_spec)


def test_overrides_and_links_apply(base_spec: dict[str, Any]) -> None:
    base_spec["gpus"] = [{"name": "h100-sxm", "hbm_gbps": 3000}]
    base_spec["network"]["links"] = [{"from": "mi300x", "to": "h100-sxm", "gbps": 200}]
    inputs = resolve(parse_spec(base_spec))
    assert inputs.gpus["h100-sxm"].hbm_gbps == 3000
    assert inputs.link_gbps[("mi300x", "h100-sxm")] == 200
    assert inputs.link_gbps[("h100-sxm", "mi300x")] == 100
    assert inputs.link_gbps[("mi300x", "mi300x")] == 400  # intra-pool default


def test_yaml_file_with_a_relative_config_path(tmp_path: Path, base_spec: dict[str, Any]) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 4096,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "intermediate_size": 14336,
                "vocab_size": 128256,
            }
        )
    )
    base_spec["model"] = {"config": "m"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(base_spec))
    inputs = resolve(load_spec(path))
    assert inputs.model.num_layers == 32


def test_trace_workload(tmp_path: Path, base_spec: dict[str, Any]) -> None:
    lines = [
        json.dumps({"prompt_tokens": 100 * (i + 1), "output_tokens": 50, "arrival_s": i * 0.5})
        for i in range(5)
    ]
    (tmp_path / "trace.jsonl").write_text("\n".join(lines))
    base_spec["workload"] = {"trace": str(tmp_path / "trace.jsonl")}
    inputs = resolve(parse_spec(base_spec))
    assert inputs.mix.rate == pytest.approx(2.0)
    assert inputs.mix.mean_prompt == pytest.approx(300, rel=0.05)
    (tmp_path / "trace.jsonl").write_text('{"prompt_tokens": 5}\n')
    assert "line 1: expected a JSON object with integer prompt_tokens and output_tokens" in _error(
        base_spec
    )


@settings(max_examples=40, deadline=None)
@given(
    rate=st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3), st.none()),
    count=st.one_of(st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=3)),
)
def test_malformed_values_raise_planner_errors_only(rate: Any, count: Any) -> None:
    spec = {
        "model": "llama-3-8b",
        "inventory": [{"gpu": "l4", "count": count, "price_per_hour": 1.0}],
        "network": {"inter_pool_gbps": 100},
        "workload": {"rate": rate, "prompt_tokens": {"mean": 10}, "output_tokens": {"mean": 10}},
        "slo": {"ttft_s": 1.0, "tpot_s": 0.1},
    }
    try:
        resolve(parse_spec(spec))
    except PlannerError as exc:
        assert str(exc)


ISSUE_EXAMPLE = """
model: llama-3-70b                         # or {config: path/to/config.json}
inventory:
  - {gpu: h100-sxm, count: 16, price_per_hour: 4.0}
  - {gpu: mi300x, count: 8, price_per_hour: 3.5}
  - {gpu: ascend-910b, count: 16, price_per_hour: 1.8}
network: {inter_pool_gbps: 100}          # the KV path between pools of different GPU types
workload: {rate: 5.0, prompt_tokens: {mean: 2048}, output_tokens: {mean: 256}}
slo: {ttft_s: 1.0, tpot_s: 0.05, percentile: 90, attainment: 0.9}
objective: min_cost                        # or max_goodput with a budget_per_hour
"""


def test_the_issue_example_spec_parses(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(ISSUE_EXAMPLE)
    inputs = resolve(load_spec(path))
    assert list(inputs.counts.items()) == [("h100-sxm", 16), ("mi300x", 8), ("ascend-910b", 16)]
    assert inputs.link_gbps[("h100-sxm", "mi300x")] == 100
    assert inputs.mix.rate == 5.0 and inputs.mix.mean_prompt == 2048
    assert inputs.level == pytest.approx(0.9**0.5)
