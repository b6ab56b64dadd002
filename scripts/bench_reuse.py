"""KV reuse, measured on a whole system: prefix caching and conversations.

    python scripts/bench_reuse.py --model models/smollm2-135m-instruct [--output FILE]

On the demo's two-layout topology (prefill vllm-flash/16 -> converter -> decode ascend/128):
1. repeated prompts: a --long-prompt token prompt (1500) sent cold, again (the same), and a
   prompt sharing 90% of it: TTFT and the cached tokens the API reports, for --prompts
   different prompts (medians);
2. conversations: `hetserve bench serve` with --turns turns of --turn-tokens new tokens after a
   --shared-prefix system prompt, at --concurrency, with prefix caching on (default) and off
   (HETSERVE_PREFIX_CACHING=false on every worker), each --repeat times in alternation: TTFT,
   cached tokens, and the KV bytes the system moved (hetserve_kv_sent_bytes_total summed over
   every process: prefill -> converter -> decode).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from services.bench.client import build_payload, send_request
from services.bench.serve import BenchConfig, run_benchmark
from services.bench.system import running
from services.bench.workload import BenchRequest


def topology(model: str) -> dict:
    return {
        "model": model,
        "prefill": [{"name": "p-flash", "kv_layout": "vllm-flash", "block_size": 16}],
        "decode": [{"name": "d-ascend", "kv_layout": "ascend", "block_size": 128}],
        "converter": {"replicas": 1},
    }


async def one(base_url: str, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    body = build_payload("completions", model, BenchRequest(prompt, max_tokens, len(prompt)))
    async with aiohttp.ClientSession() as session:
        result = await send_request(session, base_url + "/completions", body, timeout_s=600)
    if not result.ok:
        raise RuntimeError(result.error)
    return {"ttft_s": result.ttft, "cached_tokens": result.cached_tokens}


async def repeated(base_url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    rows = []
    for _ in range(args.prompts):
        prompt = rng.integers(10, args.vocab, size=args.long_prompt).tolist()
        keep = int(args.long_prompt * 0.9)
        shared = prompt[:keep] + rng.integers(10, args.vocab, size=args.long_prompt - keep).tolist()
        cold = await one(base_url, model, prompt, 8)
        warm = await one(base_url, model, prompt, 8)
        near = await one(base_url, model, shared, 8)
        rows.append({"cold": cold, "again": warm, "shared_90pct": near})
    median = {
        kind: {
            key: statistics.median(r[kind][key] or 0 for r in rows)
            for key in ("ttft_s", "cached_tokens")
        }
        for kind in ("cold", "again", "shared_90pct")
    }
    median["ttft_ratio_again_over_cold"] = median["again"]["ttft_s"] / median["cold"]["ttft_s"]
    return {"prompts": rows, "median": median}


async def conversation_run(system, model: str, args: argparse.Namespace) -> dict[str, Any]:  # noqa: ANN001
    before = system.counter("hetserve_kv_sent_bytes_total")
    config = BenchConfig(
        base_url=system.base_url, model=model, num_requests=args.conversations * args.turns,
        concurrency=args.concurrency, turns=args.turns, shared_prefix=args.shared_prefix,
        prompt_tokens=f"fixed:{args.turn_tokens}", output_tokens=f"fixed:{args.output_tokens}",
        vocab_size=args.vocab, seed=3, timeout=600,
    )  # fmt: skip
    run = await run_benchmark(config)
    moved = system.counter("hetserve_kv_sent_bytes_total") - before
    s = run.summary
    return {
        "requests_ok": s.requests_ok,
        "requests_failed": s.requests_failed,
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.cached_tokens,
        "ttft_p50_ms": s.ttft.p50,
        "ttft_p90_ms": s.ttft.p90,
        "tpot_p50_ms": s.tpot.p50,
        "kv_bytes_moved": moved,
        "duration_s": s.duration_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--long-prompt", type=int, default=1500)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=64)
    parser.add_argument("--shared-prefix", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=40000)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    model_name = Path(args.model).name
    report: dict[str, Any] = {"args": vars(args) | {"output": str(args.output)}}
    with running(topology(args.model)) as system:
        report["repeated_prompt"] = asyncio.run(repeated(system.base_url, model_name, args))
    runs: dict[str, list] = {"reuse": [], "no_reuse": []}
    for _ in range(args.repeat):
        for kind, env in (("reuse", {}), ("no_reuse", {"HETSERVE_PREFIX_CACHING": "false"})):
            with running(topology(args.model), env=env) as system:
                runs[kind].append(asyncio.run(conversation_run(system, model_name, args)))
    report["conversations"] = runs
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
