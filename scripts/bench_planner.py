"""Time the planner on a large heterogeneous inventory: 10 GPU types, 1,000 GPUs.

    PYTHONPATH=. python scripts/bench_planner.py [--model llama-3-70b] [--rate 40] [--json]

(or without PYTHONPATH once the project is installed: pip install -e .)

"Plan" is what the 2-second target covers: resolving the spec, the per-configuration search
(queueing estimates for every GPU type, TP, PP and KV destination) and the MILP. The
simulation checks and the baselines are timed separately, once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from services.planner.inputs import resolve
from services.planner.planner import plan
from services.planner.spec import parse_spec

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


def bench_spec(model: str, rate: float) -> dict[str, Any]:
    return {
        "model": model,
        "inventory": [{"gpu": g, "count": n, "price_per_hour": p} for g, n, p in INVENTORY],
        "network": {"inter_pool_gbps": 100, "intra_pool_gbps": 400},
        "workload": {
            "rate": rate,
            "prompt_tokens": {"mean": 2048, "distribution": "lognormal", "cv": 0.5, "max": 8192},
            "output_tokens": {"mean": 256, "distribution": "lognormal", "cv": 0.5, "max": 2048},
        },
        "slo": {"ttft_s": 1.5, "tpot_s": 0.06, "percentile": 90, "attainment": 0.9},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-70b")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s to plan for")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    spec = bench_spec(args.model, args.rate)

    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        report = plan(resolve(parse_spec(spec)), simulate=False, baselines=False)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    checked = plan(resolve(parse_spec(spec)), simulate=True, baselines=True)
    full = time.perf_counter() - start

    outcome = report.plan
    result = {
        "gpu_types": len(INVENTORY),
        "gpus": 1000,
        "model": args.model,
        "rate": args.rate,
        "plan_seconds_median": statistics.median(times),
        "plan_seconds_max": max(times),
        "search_seconds": report.seconds["search"],
        "milp_seconds": report.seconds["solve"],
        "feasible": outcome.feasible,
        "cost_per_hour": outcome.cost_per_hour,
        "gpus_used": sum(p.gpus for p in outcome.pools),
        "with_simulation_and_baselines_seconds": full,
        "simulated_attainment": checked.plan.simulated.attainment if checked.plan.simulated else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"10 GPU types, 1,000 GPUs, {args.model} at {args.rate:g} req/s: plan in "
        f"{result['plan_seconds_median']:.2f} s median (max {result['plan_seconds_max']:.2f} s "
        f"over {args.repeats}; search {result['search_seconds']:.2f} s, MILP "
        f"{result['milp_seconds']:.2f} s)"
    )
    print(
        f"plan: {outcome.cost_per_hour}/h on {result['gpus_used']} GPUs; with simulation checks "
        f"and baselines: {full:.1f} s, simulated attainment {result['simulated_attainment']}"
    )
    for pool in outcome.pools:
        print(f"  {pool.role:8} {pool.gpu:12} tp={pool.tp} pp={pool.pp} x{pool.instances}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
