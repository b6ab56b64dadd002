"""`hetserve bench serve` on a running topology, with Hugging Face transformers as the same-run
baseline: HF's greedy prefill latency (its TTFT) and per-token decode time (its TPOT) at batch
1 on prompts of the same lengths, measured in this process right after the load test.

    python scripts/bench_serve_vs_hf.py --model models/tiny-llama [--topology FILE]

Starts `hetserve up` itself (embedded NATS), waits for /health, runs bench serve at
concurrency 1 (latency) and at a Poisson rate (load), then the HF baseline; prints a table of
both and their ratios, and writes the JSON with --output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from services.bench.report import to_json
from services.bench.serve import BenchConfig, run_benchmark
from services.common.nats_server import free_port


def wait_healthy(port: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("system did not become healthy")


def hf_baseline(model_dir: str, prompt_lengths: list[int], output_tokens: int, vocab: int,
                seed: int) -> dict[str, float]:
    """HF transformers at batch 1: prefill latency and mean decode time per token."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)  # like each hetserve worker (HETSERVE_TORCH_THREADS=1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    ttft, tpot = [], []
    with torch.inference_mode():
        for length in prompt_lengths:
            ids = torch.tensor([rng.integers(10, vocab, size=length).tolist()])
            start = time.perf_counter()
            out = model(ids, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            ttft.append(time.perf_counter() - start)
            cache = out["cache"]
            start = time.perf_counter()
            for _ in range(output_tokens - 1):
                out = model(token, cache=cache, use_cache=True)
                cache, token = out["cache"], out.logits[:, -1:].argmax(-1)
            tpot.append((time.perf_counter() - start) / max(1, output_tokens - 1))
    return {"ttft_ms_p50": statistics.median(ttft) * 1e3,
            "tpot_ms_p50": statistics.median(tpot) * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-llama")
    parser.add_argument("--topology", help="default: the built-in demo topology")
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", default="uniform:16,256")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the JSON report here")
    args = parser.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "services.common.cli", "--log-level", "WARNING", "up",
           "--model", args.model, "--port", str(port)]
    if args.topology:
        cmd += ["--topology", args.topology]
    system = subprocess.Popen(cmd)
    try:
        wait_healthy(port)
        common = dict(base_url=f"http://127.0.0.1:{port}/v1", num_requests=args.num_requests,
                      prompt_tokens=args.prompt_tokens, output_tokens=f"fixed:{args.output_tokens}",
                      vocab_size=args.vocab_size, seed=args.seed, warmup=2)
        latency = asyncio.run(run_benchmark(BenchConfig(concurrency=1, **common)))
        load = asyncio.run(run_benchmark(BenchConfig(rate=args.rate, **common)))
    finally:
        system.send_signal(signal.SIGINT)
        system.wait(60)
    lengths = [r.prompt_tokens for r in latency.results if r.ok][:16]
    hf = hf_baseline(args.model, lengths, args.output_tokens, args.vocab_size, args.seed)
    print(f"{'':34}{'TTFT p50 ms':>14}{'TPOT p50 ms':>14}")
    for name, summary in (("hetserve, concurrency 1", latency.summary),
                          (f"hetserve, Poisson {args.rate}/s", load.summary)):
        ttft, tpot = summary.ttft.p50, summary.tpot.p50
        print(f"{name:34}{ttft:14.1f}{tpot:14.2f}   ({ttft / hf['ttft_ms_p50']:.2f}x / "
              f"{tpot / hf['tpot_ms_p50']:.2f}x HF)")
    print(f"{'HF transformers, batch 1':34}{hf['ttft_ms_p50']:14.1f}{hf['tpot_ms_p50']:14.2f}")
    print(f"output throughput: {latency.summary.output_token_throughput:.1f} tok/s at "
          f"concurrency 1, {load.summary.output_token_throughput:.1f} tok/s at {args.rate}/s")
    report = {"latency": json.loads(to_json(latency)), "load": json.loads(to_json(load)),
              "hf_transformers_batch1": hf}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
