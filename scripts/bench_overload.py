"""Overload: `hetserve bench serve` at twice the measured capacity, against the same load at
capacity, with the gateway's and the scheduler's RSS sampled throughout.

    python scripts/bench_overload.py --model models/tiny-llama [--rates 2,4,8,12,16,24]

Starts the demo topology (`hetserve up`, embedded NATS) with the given admission bounds, then:
1. capacity: Poisson runs of --sweep-seconds at each rate of --rates (which must reach past
   saturation); capacity is the highest goodput (completed requests/s) any of them reached;
2. at capacity for --seconds, then at 2x capacity for --seconds (same workload, same seed),
   --repeat times in alternation;
3. RSS of the gateway and scheduler processes every 0.25 s: before the first run at
   capacity, the peak during the 2x runs, and --settle seconds after the last.
Prints a summary and writes the whole JSON report with --output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from services.bench.report import to_json
from services.bench.serve import BenchConfig, BenchRun, run_benchmark
from services.bench.system import wait_healthy
from services.common.nats_server import free_port


def service_processes(up: subprocess.Popen) -> dict[str, psutil.Process]:
    """The `hetserve serve gateway` and `... scheduler` children of `hetserve up`."""
    found = {}
    for child in psutil.Process(up.pid).children(recursive=True):
        cmdline = child.cmdline()
        if cmdline[-2:] in (["serve", "gateway"], ["serve", "scheduler"]):
            found[cmdline[-1]] = child
    if set(found) != {"gateway", "scheduler"}:
        raise RuntimeError(f"gateway and scheduler processes not found (found {sorted(found)})")
    return found


@dataclass
class RssSampler:
    """RSS (MiB) of some processes, sampled in a thread; marks split the series."""

    processes: dict[str, psutil.Process]
    interval_s: float = 0.25
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> RssSampler:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            rss = {n: p.memory_info().rss / 2**20 for n, p in self.processes.items()}
            self.samples.append((now, rss))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()

    def last(self) -> dict[str, float]:
        return dict(self.samples[-1][1])

    def peak(self, since: float, until: float) -> dict[str, float]:
        window = [rss for t, rss in self.samples if since <= t <= until]
        return {name: max(rss[name] for rss in window) for name in self.processes}


def summary_row(run: BenchRun) -> dict[str, Any]:
    s = run.summary
    sent = s.requests_ok + s.requests_shed + s.requests_failed
    return {
        "offered_rate": run.config.rate,
        "requests": sent,
        "admitted": sent - s.requests_shed,
        "completed": s.requests_ok,
        "shed": s.requests_shed,
        "failed": s.requests_failed,
        "goodput_req_s": s.request_throughput,
        "goodput_tok_s": s.output_token_throughput,
        "ttft_p50_ms": s.ttft.p50,
        "e2e_p50_ms": s.e2e.p50,
        "e2e_p99_ms": s.e2e.p99,
        "shed_p50_ms": s.shed_latency.p50,
        "shed_p99_ms": s.shed_latency.p99,
        "errors": s.errors,
    }


def run(config: BenchConfig) -> BenchRun:
    result = asyncio.run(run_benchmark(config))
    row = summary_row(result)
    print(
        f"rate {row['offered_rate']:g}/s: {row['requests']} sent, {row['completed']} completed, "
        f"{row['shed']} shed, {row['failed']} failed; goodput {row['goodput_req_s']:.2f} req/s "
        f"({row['goodput_tok_s']:.0f} tok/s), e2e p50 {row['e2e_p50_ms']:.0f} ms, "
        f"shed p50 {row['shed_p50_ms']:.1f} ms",
        flush=True,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-llama")
    parser.add_argument("--rates", default="2,4,8,12,16,24", help="capacity sweep, req/s")
    parser.add_argument("--sweep-seconds", type=float, default=20)
    parser.add_argument("--capacity", type=float, help="skip the sweep: capacity in req/s")
    parser.add_argument("--seconds", type=float, default=60, help="length of the 1x and 2x runs")
    parser.add_argument("--settle", type=float, default=10)
    parser.add_argument("--repeat", type=int, default=2, help="1x/2x pairs, alternating")
    parser.add_argument("--prompt-tokens", default="uniform:16,256")
    parser.add_argument("--output-tokens", default="fixed:32")
    parser.add_argument("--max-inflight", type=int, default=12)
    parser.add_argument("--max-queued", type=int, default=24)
    parser.add_argument("--max-queue-wait", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="per request")
    parser.add_argument("--output", help="write the JSON report here")
    args = parser.parse_args()

    port = free_port()
    env = {
        **os.environ,
        "HETSERVE_MAX_INFLIGHT_REQUESTS": str(args.max_inflight),
        "HETSERVE_MAX_QUEUED_REQUESTS": str(args.max_queued),
        "HETSERVE_MAX_QUEUE_WAIT_S": str(args.max_queue_wait),
    }
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "--log-level", "WARNING", "up"]
        + ["--model", args.model, "--port", str(port)],
        env=env,
    )
    report: dict[str, Any] = {"args": vars(args)}
    try:
        wait_healthy(port, 300)
        sampler = RssSampler(service_processes(up)).start()

        def config(rate: float, seconds: float, warmup: int = 0) -> BenchConfig:
            return BenchConfig(
                base_url=f"http://127.0.0.1:{port}/v1",
                num_requests=max(1, round(rate * seconds)),
                rate=rate,
                prompt_tokens=args.prompt_tokens,
                output_tokens=args.output_tokens,
                vocab_size=1024,
                warmup=warmup,
                timeout=args.timeout,
            )

        capacity = args.capacity
        if capacity is None:
            sweep = [run(config(float(r), args.sweep_seconds, 2)) for r in args.rates.split(",")]
            report["sweep"] = [summary_row(r) for r in sweep]
            # Goodput follows the offered rate up to the system's capacity, then stays flat.
            capacity = round(max(r.summary.request_throughput for r in sweep), 1)
        print(f"capacity: {capacity:g} req/s", flush=True)
        # 1x and 2x alternate, so that a shared machine's drifting load hits both alike.
        pairs, runs, peaks = [], [], []
        before = sampler.last()
        for _ in range(args.repeat):
            at_capacity = run(config(capacity, args.seconds))
            time.sleep(args.settle)
            began = time.monotonic()
            overload = run(config(2 * capacity, args.seconds))
            peaks.append(sampler.peak(began, time.monotonic()))
            time.sleep(args.settle)
            one, two = summary_row(at_capacity), summary_row(overload)
            pairs.append(
                {
                    "load_average": os.getloadavg(),
                    "at_capacity": one,
                    "at_2x": two,
                    "goodput_2x_over_1x": two["goodput_req_s"] / one["goodput_req_s"],
                }
            )
            runs.append({"at_capacity": to_json(at_capacity), "at_2x": to_json(overload)})
        rss = {
            "before": before,
            "peak": {name: max(peak[name] for peak in peaks) for name in before},
            "after": sampler.last(),
        }
        sampler.stop()
        report.update(
            capacity_req_s=capacity,
            pairs=pairs,
            rss_mib=rss,
            runs=[{k: json.loads(v) for k, v in pair.items()} for pair in runs],
        )
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
        if args.output:
            Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
