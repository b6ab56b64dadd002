"""Fit the performance model's efficiency factors to measured step times, and say how wrong
it is on measurements the fit did not see (MAPE per phase)."""

from __future__ import annotations

import datetime
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import least_squares

from services.planner.catalog import GpuSpec
from services.planner.engine_probe import EngineTimer, measure_peaks, random_model
from services.planner.errors import PlannerError
from services.planner.model_spec import ModelSpec, model_from_hf_config
from services.planner.perf_model import InstanceShape, PerfModel
from services.planner.profiles import Measurement, Profile, save_profile

HELD_OUT_EVERY = 3  # every third grid point of each phase is kept out of the fit
PREFILL_LENGTHS = (16, 32, 64, 128, 192, 256, 384, 512, 768)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
DECODE_CONTEXTS = (32, 128, 512, 1024)
QUICK_PREFILL_LENGTHS = (8, 32, 64, 128)
QUICK_DECODE = ((1, 16), (4, 16), (1, 64), (4, 64))


def predict(model: ModelSpec, gpu: GpuSpec, m: Measurement) -> float:
    """The performance model's time for a measurement's step (one device, no TP or PP)."""
    perf = PerfModel(model, InstanceShape(gpu, 1, 1), network_gbps=1.0)
    if m.phase == "prefill":
        tokens = m.batch * m.length
        return float(perf.prefill_latency(tokens, m.batch * m.length**2, m.batch))
    return float(perf.decode_round(m.batch, m.batch * m.length))


def mark_held_out(measurements: list[Measurement]) -> list[Measurement]:
    """Hold out every HELD_OUT_EVERY-th measurement of each phase, spread over the grid."""
    seen = {"prefill": 0, "decode": 0}
    marked = []
    for m in measurements:
        held = seen[m.phase] % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
        seen[m.phase] += 1
        marked.append(m.model_copy(update={"held_out": held}))
    return marked


def mape(measurements: list[Measurement], phase: str) -> float:
    errors = [
        abs(m.predicted_s - m.seconds) / m.seconds
        for m in measurements
        if m.phase == phase and m.held_out and m.predicted_s is not None
    ]
    if not errors:
        raise PlannerError(f"calibration: no scored held-out {phase} measurement")
    return float(np.mean(errors))


def fit(
    measurements: list[Measurement], model: ModelSpec, device: GpuSpec
) -> tuple[GpuSpec, list[Measurement]]:
    """Least squares on log(predicted / measured) over the points not held out; returns the
    device with fitted efficiency and every measurement with its prediction."""
    train = [m for m in measurements if not m.held_out]
    if len(train) < 3:
        raise PlannerError(f"calibration: {len(train)} training measurements; need at least 3")

    def with_efficiency(theta: np.ndarray) -> GpuSpec:
        compute, memory, attention, overhead = theta
        eff = device.efficiency.model_copy(
            update={
                "compute": float(compute),
                "memory": float(memory),
                "attention": float(attention),
                "layer_overhead_s": float(overhead),
            }
        )
        return device.model_copy(update={"efficiency": eff})

    def residuals(theta: np.ndarray) -> np.ndarray:
        gpu = with_efficiency(theta)
        return np.array([np.log(predict(model, gpu, m) / m.seconds) for m in train])

    result = least_squares(
        residuals,
        x0=np.array([0.5, 0.5, 0.5, 1e-5]),
        bounds=([1e-4, 1e-4, 1e-4, 0.0], [1.0, 1.0, 1.0, 0.1]),
        x_scale=[0.1, 0.1, 0.1, 1e-5],
    )
    fitted = with_efficiency(result.x)
    scored = [m.model_copy(update={"predicted_s": predict(model, fitted, m)}) for m in measurements]
    return fitted, scored


def _grid(quick: bool, max_positions: int) -> tuple[list[int], list[tuple[int, int]]]:
    if quick:
        return list(QUICK_PREFILL_LENGTHS), list(QUICK_DECODE)
    limit = max_positions - 8
    lengths = [n for n in PREFILL_LENGTHS if n <= limit]
    pairs = [(b, c) for c in DECODE_CONTEXTS if c <= limit for b in DECODE_BATCHES]
    return lengths, pairs


def measure(timer: EngineTimer, quick: bool, repeats: int, passes: int) -> list[Measurement]:
    """Time the grid `passes` times over and keep each point's fastest time, so that a burst
    of other work on a shared machine spoils at most one pass of a point."""
    lengths, pairs = _grid(quick, timer.max_positions)
    timer.warm_up()
    best: dict[tuple[str, int, int], Measurement] = {}

    def keep(m: Measurement) -> None:
        key = (m.phase, m.batch, m.length)
        if key not in best or m.seconds < best[key].seconds:
            best[key] = m

    for _ in range(passes):
        for n in lengths:
            keep(Measurement(phase="prefill", batch=1, length=n, seconds=timer.prefill(n, repeats)))
        for b, c in pairs:
            keep(
                Measurement(phase="decode", batch=b, length=c, seconds=timer.decode(b, c, repeats))
            )
    return list(best.values())


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def profile_engine(
    model_dir: Path,
    device: str,
    name: str | None,
    out: Path | None,
    hidden: int | None,
    layers: int | None,
    repeats: int,
    passes: int,
    threads: int | None,
    quick: bool,
) -> tuple[Profile, Path]:
    """Measure this device and the native engine on it, fit, score, and save the profile."""
    if not (model_dir / "config.json").exists():
        raise PlannerError(
            f"--model: {model_dir} holds no config.json (make one with scripts/make_tiny_model.py)"
        )
    if (hidden is None) != (layers is None):
        raise PlannerError("--hidden and --layers go together")
    if repeats < 1 or passes < 1:
        raise PlannerError(f"--repeats and --passes must be >= 1 (got {repeats}, {passes})")
    if threads is not None:
        if threads < 1:
            raise PlannerError(f"--threads must be >= 1 (got {threads})")
        torch.set_num_threads(threads)
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise PlannerError(f"--device: {exc}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise PlannerError("--device cuda: no CUDA device is available here")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        timed_dir = model_dir
        if hidden is not None and layers is not None:
            timed_dir = random_model(model_dir, Path(scratch) / "model", hidden, layers)
        model = model_from_hf_config(timed_dir)
        if timed_dir is not model_dir:
            model = model.model_copy(update={"name": f"random-{hidden}x{layers}-{model_dir.name}"})
        dtype = torch.float32 if model.bytes_per_element == 4 else torch.bfloat16
        peaks = measure_peaks(torch_device, dtype, size=1024 if quick else 2048)
        max_tokens = max(DECODE_BATCHES) * (max(DECODE_CONTEXTS) + repeats + 8)
        timer = EngineTimer(timed_dir, device, max_tokens)
        measurements = mark_held_out(measure(timer, quick, repeats, passes))
    conditions = (
        f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on "
        f"{os.cpu_count()} cores; {torch.get_num_threads()} torch threads; fastest of "
        f"{repeats} runs x {passes} passes per point"
    )
    label = name or f"{torch_device.type}-{_slug(peaks.description.split(',')[0])[:40]}"
    base = GpuSpec(
        name=label,
        vendor=torch_device.type,
        tflops_bf16=peaks.flops / 1e12,
        dense=True,
        hbm_gbps=peaks.bytes_per_s / 1e9,
        memory_gb=peaks.memory_gb,
        link_gbps=1.0,
        gpus_per_node=1,
        source=f"measured by hetserve profile ({'quick' if quick else 'full'}): {dtype} matmul and a streaming sum",
        note=f"{peaks.description}; TFLOP/s are in {str(dtype).removeprefix('torch.')}",
    )
    fitted, scored = fit(measurements, model, base)
    profile = Profile(
        gpu=fitted,
        device=peaks.description,
        conditions=conditions,
        engine=f"services.engine NativeEngine (torch {torch.__version__})",
        model=model,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        mape={phase: mape(scored, phase) for phase in ("prefill", "decode")},
        measurements=tuple(scored),
    )
    path = out or Path("profiles") / f"{label}.json"
    try:
        save_profile(profile, path)
    except OSError as exc:
        raise PlannerError(f"--out: cannot write {path}: {exc.strerror}") from None
    return profile, path
