"""Time the planner on a large heterogeneous inventory: 10 GPU types, 1,000 GPUs.

    PYTHONPATH=. python scripts/bench_planner.py [--model llama-3-70b] [--json]
        [--against DIR]   # also time the planner of another checkout, in the same run

(or without PYTHONPATH once the project is installed: pip install -e .)

At each arrival rate (the larger the rate, the more of the 1,000 GPUs the plan uses) three
calls are timed, each from the spec on (resolve, search, MILP to a proven optimum, ...):
  plan       the plan alone, from the queueing estimates (no simulation, no baselines);
  baselines  the plan and the three baselines, from the estimates;
  full       what `hetserve plan` does by default: the plan and the baselines with their
             simulation checks.
Wall and CPU seconds are both reported (on a shared machine wall time includes waiting for a
core); each is the median of --repeats runs. With --against, the same calls run on the other
checkout's planner (for example the commit before a change) in alternation with this one, each
in its own process, and the table gives this checkout's time as a ratio of the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

INVENTORY = (  # (type, count, price per GPU-hour): 10 types, 1,000 GPUs
    ("h100-sxm", 160, 4.0),
    ("h200", 80, 5.0),
    ("a100-80gb", 160, 2.2),
    ("a100-40gb", 80, 1.6),
    ("l40s", 120, 1.1),
    ("a10", 80, 0.6),
    ("mi300x", 96, 3.5),
    ("ascend-910b", 112, 1.8),
    ("gaudi2", 64, 1.5),
    ("gaudi3", 48, 2.8),
)
MODES = {"plan": (False, False), "baselines": (False, True), "full": (True, True)}
ROOT = Path(__file__).resolve().parents[1]


def bench_spec(model: str, rate: float, inter_gbps: float, intra_gbps: float) -> dict[str, Any]:
    return {
        "model": model,
        "inventory": [{"gpu": g, "count": n, "price_per_hour": p} for g, n, p in INVENTORY],
        "network": {"inter_pool_gbps": inter_gbps, "intra_pool_gbps": intra_gbps},
        "workload": {
            "rate": rate,
            "prompt_tokens": {"mean": 2048, "distribution": "lognormal", "cv": 0.5, "max": 8192},
            "output_tokens": {"mean": 256, "distribution": "lognormal", "cv": 0.5, "max": 2048},
        },
        "slo": {"ttft_s": 1.5, "tpot_s": 0.06, "percentile": 90, "attainment": 0.9},
    }


def time_once(spec: dict[str, Any], mode: str) -> dict[str, Any]:
    """One planning call from the spec, in this process (whichever planner it imports)."""
    from services.planner.inputs import resolve
    from services.planner.planner import plan
    from services.planner.spec import parse_spec

    simulate, baselines = MODES[mode]
    wall, cpu = time.perf_counter(), time.process_time()
    report = plan(resolve(parse_spec(spec)), simulate=simulate, baselines=baselines)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    outcome = report.plan
    sim = outcome.simulated
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "stages_s": report.seconds,
        "feasible": outcome.feasible,
        "cost_per_hour": outcome.cost_per_hour,
        "gpus_used": sum(p.gpus for p in outcome.pools),
        "roles": sorted({p.role for p in outcome.pools}),
        "attainment": sim.attainment if sim else None,
        "meets_slo": sim.meets_slo if sim else None,
    }


def _worker(request: dict[str, Any]) -> None:
    spec = bench_spec(request["model"], request["rate"], request["inter"], request["intra"])
    runs = [time_once(spec, request["mode"]) for _ in range(request["repeats"])]
    print(json.dumps(runs))


def _in_tree(tree: Path, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the timing in a fresh process that imports the planner from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(request)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tree,
    )
    return json.loads(done.stdout.splitlines()[-1])


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-70b")
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 250, 400, 550, 700])
    parser.add_argument("--inter-gbps", type=float, default=400, help="between pools")
    parser.add_argument("--intra-gbps", type=float, default=1600, help="within a pool")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--against", type=Path, help="another checkout to time alongside")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0

    trees = {"this": ROOT}
    if args.against is not None:
        trees["against"] = args.against.resolve()
    rows = []
    for rate in args.rates:
        for mode in args.modes:
            row: dict[str, Any] = {"rate": rate, "mode": mode}
            request = {
                "model": args.model,
                "rate": rate,
                "inter": args.inter_gbps,
                "intra": args.intra_gbps,
                "mode": mode,
                "repeats": 1,
            }
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
            for _ in range(args.repeats):  # alternate, so both see the same machine load
                for name, tree in trees.items():
                    runs[name] += _in_tree(tree, request)
            for name, taken in runs.items():
                row[name] = {
                    "wall_s": _median(taken, "wall_s"),
                    "cpu_s": _median(taken, "cpu_s"),
                    "cost_per_hour": taken[-1]["cost_per_hour"],
                    "gpus_used": taken[-1]["gpus_used"],
                    "roles": taken[-1]["roles"],
                    "attainment": taken[-1]["attainment"],
                    "stages_s": taken[-1]["stages_s"],
                }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    summary = {
        "gpu_types": len(INVENTORY),
        "gpus": sum(n for _, n, _ in INVENTORY),
        "model": args.model,
        "network_gbps": {"inter_pool": args.inter_gbps, "intra_pool": args.intra_gbps},
        "load_average": os.getloadavg(),
        "rows": rows,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{summary['gpu_types']} GPU types, {summary['gpus']} GPUs, {args.model}, KV links "
        f"{args.inter_gbps:g}/{args.intra_gbps:g} Gbit/s between/within pools; medians of "
        f"{args.repeats}; load average at the end {summary['load_average'][0]:.1f}"
    )
    header = "rate  mode       wall s  cpu s   $/h       GPUs  roles"
    if args.against is not None:
        header += "                      | against: wall s  cpu s   $/h       cpu ratio"
    print(header)
    for row in rows:
        this = row["this"]
        cost = "-" if this["cost_per_hour"] is None else f"{this['cost_per_hour']:.1f}"
        line = (
            f"{row['rate']:<5g} {row['mode']:<10} {this['wall_s']:<7.2f} {this['cpu_s']:<7.2f} "
            f"{cost:<9} {this['gpus_used']:<5} {'+'.join(this['roles']):<26}"
        )
        if "against" in row:
            other = row["against"]
            cost = "-" if other["cost_per_hour"] is None else f"{other['cost_per_hour']:.1f}"
            ratio = this["cpu_s"] / other["cpu_s"]
            line += (
                f" |          {other['wall_s']:<7.2f}{other['cpu_s']:<7.2f} {cost:<9} {ratio:.2f}"
            )
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
