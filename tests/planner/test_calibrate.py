import json
from pathlib import Path

import numpy as np
import pytest

from services.planner.calibrate import fit, mape, mark_held_out, predict
from services.planner.catalog import Efficiency, GpuSpec
from services.planner.inputs import resolve
from services.planner.model_spec import ModelSpec
from services.planner.profiles import Measurement, Profile, load_profile, save_profile
from services.planner.spec import parse_spec

MODEL = ModelSpec(
    name="small",
    num_layers=8,
    hidden_size=512,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    intermediate_size=1792,
    vocab_size=1024,
    bytes_per_element=4,
)
DEVICE = GpuSpec(
    name="cpu-test",
    vendor="cpu",
    tflops_bf16=0.2,
    dense=True,
    hbm_gbps=30,
    memory_gb=32,
    link_gbps=1,
    gpus_per_node=1,
    source="synthetic",
)
TRUE = Efficiency(compute=0.45, memory=0.6, attention=0.2, layer_overhead_s=8e-4)


def _synthetic(noise: float, seed: int = 0) -> list[Measurement]:
    """Times the model itself would predict under TRUE, with multiplicative noise."""
    rng = np.random.default_rng(seed)
    truth = DEVICE.model_copy(update={"efficiency": TRUE})
    grid = [("prefill", 1, n) for n in (16, 32, 64, 128, 256, 384, 512, 768)]
    grid += [("decode", b, c) for c in (32, 256, 1024) for b in (1, 4, 16, 32)]
    found = []
    for phase, batch, length in grid:
        m = Measurement(phase=phase, batch=batch, length=length, seconds=1.0)
        seconds = predict(MODEL, truth, m) * float(np.exp(rng.normal(0, noise)))
        found.append(m.model_copy(update={"seconds": seconds}))
    return mark_held_out(found)


def test_every_third_point_of_each_phase_is_held_out() -> None:
    marked = _synthetic(0.0)
    for phase in ("prefill", "decode"):
        flags = [m.held_out for m in marked if m.phase == phase]
        assert flags[:6] == [False, False, True, False, False, True]


def test_fit_recovers_the_factors_from_exact_measurements() -> None:
    fitted, scored = fit(_synthetic(0.0), MODEL, DEVICE)
    eff = fitted.efficiency
    assert eff.compute == pytest.approx(TRUE.compute, rel=0.02)
    assert eff.attention == pytest.approx(TRUE.attention, rel=0.05)
    assert eff.layer_overhead_s == pytest.approx(TRUE.layer_overhead_s, rel=0.05)
    assert mape(scored, "prefill") < 0.01 and mape(scored, "decode") < 0.01


def test_mape_on_held_out_points_reflects_the_noise() -> None:
    _, scored = fit(_synthetic(0.05, seed=1), MODEL, DEVICE)
    for phase in ("prefill", "decode"):
        assert 0.005 < mape(scored, phase) < 0.15
    assert all(m.predicted_s is not None for m in scored)


def test_a_saved_profile_feeds_the_planner(tmp_path: Path, base_spec: dict) -> None:
    fitted, scored = fit(_synthetic(0.0), MODEL, DEVICE)
    profile = Profile(
        gpu=fitted,
        device="test",
        engine="synthetic",
        model=MODEL,
        created="now",
        mape={"prefill": mape(scored, "prefill"), "decode": mape(scored, "decode")},
        measurements=tuple(scored),
    )
    path = tmp_path / "cpu-test.json"
    save_profile(profile, path)
    assert load_profile(path) == profile
    base_spec["profiles"] = [str(path)]
    base_spec["inventory"] = [{"gpu": "cpu-test", "count": 2, "price_per_hour": 0.1}]
    inputs = resolve(parse_spec(base_spec))
    assert inputs.gpus["cpu-test"].efficiency == fitted.efficiency


def test_a_broken_profile_is_named(tmp_path: Path, base_spec: dict) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"gpu": {}}))
    base_spec["profiles"] = [str(tmp_path / "bad.json")]
    with pytest.raises(Exception, match="bad.json is not a profile: gpu.name"):
        resolve(parse_spec(base_spec))


def test_the_profile_command_refuses_bad_arguments(
    run_cli, tmp_path: Path, tiny_llama: Path
) -> None:
    code, _, err = run_cli("profile", "--model", str(tmp_path))
    assert code == 2 and "holds no config.json" in err
    code, _, err = run_cli("profile", "--model", str(tiny_llama), "--hidden", "64")
    assert code == 2 and "--hidden and --layers go together" in err


def test_the_profile_command_times_the_native_engine(
    run_cli, tmp_path: Path, tiny_llama: Path
) -> None:
    out = tmp_path / "cpu.json"
    code, stdout, _ = run_cli(
        "profile",
        "--model",
        str(tiny_llama),
        "--quick",
        "--repeats",
        "1",
        "--passes",
        "1",
        "--out",
        str(out),
    )
    assert code == 0 and "held-out MAPE" in stdout
    profile = load_profile(out)
    assert {m.phase for m in profile.measurements} == {"prefill", "decode"}
    assert set(profile.mape) == {"prefill", "decode"}
