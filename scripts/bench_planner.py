"""Time the planner on a large heterogeneous inventory: 10 GPU types, 1,000 GPUs.

    PYTHONPATH=. python scripts/bench_planner.py [--model llama-3-70b] [--json]

(or without PYTHONPATH once the project is installed: pip install -e .)

"Plan" is what the 2-second target covers: resolving the spec, the per-configuration search
(queueing estimates for every GPU type, TP, PP and KV destination) and the MILP to a proven
optimum, at several arrival rates (the larger the rate, the more of the 1,000 GPUs the plan
uses). Wall and CPU seconds are both reported: on a shared machine wall time includes waiting
for a core. The simulation checks and the baselines are timed once, separately.
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


def time_plan(spec: dict[str, Any], repeats: int) -> dict[str, Any]:
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        report = plan(resolve(parse_spec(spec)), simulate=False, baselines=False)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    outcome = report.plan
    return {
        "rate": spec["workload"]["rate"],
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "search_s": report.seconds["search"],
        "milp_s": report.seconds["solve"],
        "feasible": outcome.feasible,
        "cost_per_hour": outcome.cost_per_hour,
        "gpus_used": sum(p.gpus for p in outcome.pools),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-70b")
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 250, 400, 550, 700])
    parser.add_argument("--inter-gbps", type=float, default=400, help="between pools")
    parser.add_argument("--intra-gbps", type=float, default=1600, help="within a pool")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    def spec_at(rate: float) -> dict[str, Any]:
        return bench_spec(args.model, rate, args.inter_gbps, args.intra_gbps)

    rows = [time_plan(spec_at(rate), args.repeats) for rate in args.rates]
    middle = args.rates[len(args.rates) // 2]
    start = time.perf_counter()
    checked = plan(resolve(parse_spec(spec_at(middle))), simulate=True, baselines=True)
    full = time.perf_counter() - start
    sim = checked.plan.simulated
    summary = {
        "gpu_types": len(INVENTORY),
        "gpus": sum(n for _, n, _ in INVENTORY),
        "model": args.model,
        "network_gbps": {"inter_pool": args.inter_gbps, "intra_pool": args.intra_gbps},
        "plans": rows,
        "worst_wall_s": max(r["wall_s"] for r in rows),
        "worst_cpu_s": max(r["cpu_s"] for r in rows),
        "full_run": {
            "rate": middle,
            "wall_s": full,
            "attainment": sim.attainment if sim else None,
            "meets_slo": sim.meets_slo if sim else None,
        },
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"{summary['gpu_types']} GPU types, {summary['gpus']} GPUs, {args.model}, KV links "
        f"{args.inter_gbps:g}/{args.intra_gbps:g} Gbit/s between/within pools"
    )
    print("rate req/s  plan wall s  plan cpu s  search s  milp s  $/h       GPUs used")
    for r in rows:
        cost = "-" if r["cost_per_hour"] is None else f"{r['cost_per_hour']:.1f}"
        print(
            f"{r['rate']:<10g}  {r['wall_s']:<11.2f}  {r['cpu_s']:<10.2f}  {r['search_s']:<8.2f}"
            f"  {r['milp_s']:<6.2f}  {cost:<8}  {r['gpus_used']}"
        )
    print(f"worst: {summary['worst_wall_s']:.2f} s wall, {summary['worst_cpu_s']:.2f} s CPU")
    attained = "-" if sim is None else f"{sim.attainment:.1%}"
    print(
        f"with simulation checks and the three baselines at {middle:g} req/s: {full:.1f} s; "
        f"simulated attainment {attained}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
