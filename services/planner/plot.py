"""Cost against arrival rate for the plan and the baselines, as a PNG (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path

from services.planner.errors import PlannerError
from services.planner.inputs import PlanInputs
from services.planner.planner import plan, search_all

RATE_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


def cost_curves(inputs: PlanInputs, rates: list[float]) -> dict[str, list[float | None]]:
    """Cost per hour by strategy at each rate (None where infeasible), from the queueing
    estimates alone: no simulation, so that a sweep stays quick."""
    curves: dict[str, list[float | None]] = {}
    search = search_all(inputs)
    for rate in rates:
        report = plan(inputs.with_rate(rate), simulate=False, search=search)
        for outcome in (report.plan, *report.baselines):
            name = "single type (best)" if outcome.name.startswith("single type") else outcome.name
            curves.setdefault(name, []).append(outcome.cost_per_hour)
    return curves


def plot_costs(inputs: PlanInputs, path: Path) -> None:
    if inputs.mix.rate is None or inputs.objective != "min_cost":
        raise PlannerError("--plot needs objective min_cost and a workload.rate to sweep around")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlannerError("--plot needs matplotlib (pip install matplotlib)") from None
    rates = [inputs.mix.rate * factor for factor in RATE_FACTORS]
    curves = cost_curves(inputs, rates)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, costs in curves.items():
        points = [(r, c) for r, c in zip(rates, costs, strict=True) if c is not None]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=name)
    axes.set_xlabel("arrival rate (requests/s)")
    axes.set_ylabel("cost per hour")
    axes.set_title(f"{inputs.model.name}: cost to meet the SLO (queueing estimates)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise PlannerError(f"--plot: cannot write {path}: {exc.strerror}") from None
    finally:
        plt.close(figure)
