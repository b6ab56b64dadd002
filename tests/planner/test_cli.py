import json
from pathlib import Path
from typing import Any

import pytest
import yaml


def _spec_file(tmp_path: Path, spec: dict[str, Any], name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec) if name.endswith(".yaml") else json.dumps(spec))
    return str(path)


def test_plan_json_has_the_promised_shape(
    run_cli, tmp_path: Path, base_spec: dict[str, Any]
) -> None:
    base_spec["search"] = {"colocated": False}  # P/D pools only (colocated ones are cheaper here)
    code, out, _ = run_cli("plan", _spec_file(tmp_path, base_spec), "--json", "--no-simulate")
    assert code == 0
    result = json.loads(out)
    assert result["feasible"] is True and result["cost_per_hour"] > 0
    for phase in ("prefill", "decode"):
        assert result[phase], phase
        for pool in result[phase]:
            assert {"gpu", "tp", "pp", "instances"} <= set(pool)
    assert {"ttft_s", "tpot_s", "attainment"} <= set(
        result["predicted"] or {"ttft_s", "tpot_s", "attainment"}
    )
    for baseline in result["baselines"].values():
        assert {"cost_per_hour", "feasible", "ratio"} <= set(baseline)
    assert result["topology"]["services"]["prefill"]["scale"] >= 1


def test_plan_table_with_simulation_compose_and_topology(
    run_cli, tmp_path: Path, base_spec: dict[str, Any]
) -> None:
    base_spec["model"] = "llama-3-8b"
    base_spec["simulation"] = {"requests": 300}
    base_spec["search"] = {"colocated": False}  # the compose file runs prefill and decode only
    topology = tmp_path / "topology.yaml"
    code, out, _ = run_cli(
        "plan",
        _spec_file(tmp_path, base_spec, "spec.json"),
        "--compose",
        "--topology",
        str(topology),
        "--no-baselines",
    )
    assert code == 0
    assert "cost " in out and "simulated (300 requests)" in out and "attainment" in out
    assert (
        "scale: decode=" in out
        and "docker compose -f compose/docker-compose.yml up -d --scale" in out
    )
    written = yaml.safe_load(topology.read_text())
    assert {p["role"] for p in written["pools"]} == {"prefill", "decode"}


def test_plan_plot_writes_a_png(run_cli, tmp_path: Path, base_spec: dict[str, Any]) -> None:
    png = tmp_path / "cost.png"
    base_spec["model"] = "llama-3-8b"
    code, _, _ = run_cli(
        "plan",
        _spec_file(tmp_path, base_spec),
        "--no-simulate",
        "--no-baselines",
        "--plot",
        str(png),
    )
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda s: s["workload"].update(rate=-2),
            "workload.rate: Input should be greater than 0 (got -2)",
        ),
        (lambda s: s.update(inventory=[]), "inventory: is empty"),
        (lambda s: s["inventory"][0].update(gpu="h1000"), "inventory[0].gpu: unknown GPU 'h1000'"),
        (lambda s: s.update(model="gpt-5"), "model: unknown model 'gpt-5'"),
        (lambda s: s.update(colour="blue"), "colour: Extra inputs are not permitted"),
    ],
)
def test_bad_specs_exit_2_with_a_precise_message(
    run_cli, tmp_path: Path, base_spec: dict[str, Any], change, expected: str
) -> None:
    change(base_spec)
    code, out, err = run_cli("plan", _spec_file(tmp_path, base_spec))
    assert code == 2 and out == ""
    assert expected in err and "Traceback" not in err


def test_unreadable_and_malformed_files(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("plan", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml: cannot read" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed")
    code, _, err = run_cli("plan", str(broken))
    assert code == 2 and "not valid YAML" in err
    broken.write_text("- just\n- a list\n")
    code, _, err = run_cli("plan", str(broken))
    assert code == 2 and "must be a mapping" in err


def test_an_infeasible_plan_exits_1_and_says_why(
    run_cli, tmp_path: Path, base_spec: dict[str, Any]
) -> None:
    base_spec["slo"]["tpot_s"] = 0.0001
    code, out, _ = run_cli("plan", _spec_file(tmp_path, base_spec), "--no-simulate")
    assert code == 1
    assert "no feasible plan: no decode configuration meets TPOT <= 0.0001 s" in out


def test_rate_override(run_cli, tmp_path: Path, base_spec: dict[str, Any]) -> None:
    code, _, err = run_cli("plan", _spec_file(tmp_path, base_spec), "--rate", "0")
    assert code == 2 and "--rate must be > 0" in err
    code, out, _ = run_cli(
        "plan",
        _spec_file(tmp_path, base_spec),
        "--rate",
        "2",
        "--json",
        "--no-simulate",
        "--no-baselines",
    )
    assert code == 0 and json.loads(out)["workload"]["rate"] == 2


def test_a_colocated_plan_in_json_topology_and_compose(
    run_cli, tmp_path: Path, base_spec: dict[str, Any]
) -> None:
    base_spec["model"] = "llama-3-8b"  # one colocated GPU serves 5 req/s at least cost
    topology = tmp_path / "topology.yaml"
    code, out, err = run_cli(
        "plan",
        _spec_file(tmp_path, base_spec),
        "--json",
        "--no-simulate",
        "--compose",
        "--topology",
        str(topology),
    )
    assert code == 0
    result = json.loads(out)
    assert result["plan_from"] == "joint search"
    assert result["both"] and not result["prefill"] and not result["decode"]
    pool = result["both"][0]
    assert pool["role"] == "both" and pool["predicted_tpot_s"] > 0
    assert set(pool["speed"]) == {
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "decode_step_s",
        "batch",
        "requests_per_s",
    }
    assert result["cost_per_hour"] <= result["baselines"]["colocated (no P/D)"]["cost_per_hour"]
    written = yaml.safe_load(topology.read_text())
    assert written["services"] == {"both": {"scale": pool["instances"]}}
    (entry,) = written["pools"]
    assert entry["role"] == "both" and entry["speed"]["decode_step_s"] > 0
    assert "scale: both=" in err and "compose's `both` service" in err
    n = pool["instances"]
    assert f"--profile aggregated up -d --scale both={n} --scale decode=0 --scale prefill=0" in err
