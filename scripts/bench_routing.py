"""Placement, measured on whole systems: capability-aware routing against the load policy on a
fleet with a fast and a slow instance of each role, and conditional disaggregation for short
prompts.

    python scripts/bench_routing.py --model models/tiny-llama [--parts heterogeneous,short]
        [--output FILE]

1. heterogeneous: two prefill and two decode instances of one layout, one of each slowed by
   HETSERVE_STEP_DELAY_S (--slow-prefill-s, --slow-decode-s per engine step); the same Poisson
   workload (--rate, --requests) with HETSERVE_ROUTING=kv_aware and =load, --repeat times in
   alternation: TTFT and TPOT p50/p90;
2. short prompts: prefill vllm-flash/16 -> converter -> decode ascend/128; two workloads at
   once, short prompts (--short-tokens) and long ones (--long-tokens), with the decode
   prefilling prompts up to --local-below tokens itself, and without (0): TTFT per class.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from services.bench.serve import BenchConfig, BenchRun, run_benchmark
from services.bench.system import running


def heterogeneous(model: str, slow_prefill_s: float, slow_decode_s: float) -> dict:
    def worker(name: str, delay: float) -> dict:
        return {"name": name, "kv_layout": "vllm-flash", "block_size": 16,
                "env": {"HETSERVE_STEP_DELAY_S": str(delay)}}  # fmt: skip

    return {
        "model": model,
        "prefill": [worker("p-fast", 0.0), worker("p-slow", slow_prefill_s)],
        "decode": [worker("d-fast", 0.0), worker("d-slow", slow_decode_s)],
        "converter": {"replicas": 0},
    }


def converted(model: str, local_below: int) -> dict:
    return {
        "model": model,
        "prefill": [{"name": "p-flash", "kv_layout": "vllm-flash", "block_size": 16}],
        "decode": [
            {
                "name": "d-ascend",
                "kv_layout": "ascend",
                "block_size": 128,
                "prefill_locally_below": local_below,
            }
        ],  # fmt: skip
        "converter": {"replicas": 1},
    }


def row(run: BenchRun) -> dict[str, Any]:
    s = run.summary
    return {
        "ok": s.requests_ok,
        "failed": s.requests_failed,
        "ttft_p50_ms": s.ttft.p50,
        "ttft_p90_ms": s.ttft.p90,
        "tpot_p50_ms": s.tpot.p50,
        "tpot_p90_ms": s.tpot.p90,
        "output_tok_s": s.output_token_throughput,
    }


def config(base_url: str, model: str, rate: float, n: int, prompt: str, output: str, seed: int):  # noqa: ANN201
    return BenchConfig(
        base_url=base_url, model=model, num_requests=n, rate=rate, prompt_tokens=prompt,
        output_tokens=output, vocab_size=1000, seed=seed, timeout=300,
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--slow-prefill-s", type=float, default=0.05)
    parser.add_argument("--slow-decode-s", type=float, default=0.03)
    parser.add_argument("--short-tokens", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=768)
    parser.add_argument("--local-below", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--parts", default="heterogeneous,short", help="which runs, comma-separated"
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    name = Path(args.model).name
    report: dict[str, Any] = {"args": vars(args) | {"output": str(args.output)}}
    hetero: dict[str, list] = {"kv_aware": [], "load": []}
    for _ in range(args.repeat if "heterogeneous" in parts else 0):
        for policy in hetero:
            topo = heterogeneous(args.model, args.slow_prefill_s, args.slow_decode_s)
            with running(topo, env={"HETSERVE_ROUTING": policy}) as system:
                load = config(system.base_url, name, args.rate, args.requests,
                              "uniform:64,256", "fixed:32", 11)  # fmt: skip
                hetero[policy].append(row(asyncio.run(run_benchmark(load))))
    report["heterogeneous"] = hetero
    short: dict[str, list] = {"local_prefill": [], "always_disaggregated": []}
    for _ in range(args.repeat if "short" in parts else 0):
        for kind, below in (("local_prefill", args.local_below), ("always_disaggregated", 0)):
            with running(converted(args.model, below)) as system:

                async def both(url: str = system.base_url) -> tuple[BenchRun, BenchRun]:
                    shorts = config(url, name, args.rate, args.requests,
                                    f"fixed:{args.short_tokens}", "fixed:16", 5)  # fmt: skip
                    longs = config(url, name, args.rate / 4, args.requests // 4,
                                   f"fixed:{args.long_tokens}", "fixed:16", 6)  # fmt: skip
                    return await asyncio.gather(run_benchmark(shorts), run_benchmark(longs))

                runs = asyncio.run(both())
                short[kind].append({"short": row(runs[0]), "long": row(runs[1])})
    report["short_prompts"] = short
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
