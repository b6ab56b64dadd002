"""`hetserve bench serve` arguments; services.cli calls register() on `bench`'s subparsers
(`bench kv` is in kv_cli.py).

Exit codes: 0 every request succeeded or was shed (429, or 503 with Retry-After: the server
refused it for load, at once), 1 some failed, 2 bad arguments or dataset, 3 the endpoint could
not be reached to find a model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from services.bench.distributions import DISTRIBUTIONS
from services.bench.kv_cli import register as register_kv
from services.bench.report import format_table, to_json
from services.bench.serve import BenchConfig, EndpointError, run_benchmark

EXIT_OK, EXIT_FAILED_REQUESTS, EXIT_BAD_CONFIG, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def register(subparsers: Any) -> None:
    """Add `serve` and `kv` to the `bench` command's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="load-test an OpenAI-compatible endpoint",
        description="Send streamed requests at a Poisson rate or a fixed concurrency and "
        "report TTFT, TPOT, ITL, end-to-end latency and throughput.",
    )
    p.add_argument(
        "--base-url",
        default=os.environ.get("HETSERVE_BENCH_BASE_URL", DEFAULT_BASE_URL),
        help="API root including /v1 (env HETSERVE_BENCH_BASE_URL; default %(default)s)",
    )
    p.add_argument("--model", help="model name (default: the first of /v1/models)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="sent as a Bearer token (env OPENAI_API_KEY)",
    )
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument(
        "--rate", type=float, help="Poisson arrivals, requests/s ('inf': all at once)"
    )
    load.add_argument("--concurrency", type=int, help="requests in flight at all times")
    p.add_argument("--num-requests", type=int, required=True, help="measured requests")
    dist_help = f"length distribution ({', '.join(DISTRIBUTIONS)}), e.g. uniform:64,256"
    p.add_argument("--prompt-tokens", default="fixed:128", help=dist_help)
    p.add_argument("--output-tokens", default="fixed:128", help=dist_help + " (max_tokens)")
    p.add_argument("--dataset", help='JSONL rows {"prompt": str | [ids], "max_tokens": int}')
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument(
        "--turns", type=int, default=1, help="conversations of this many turns (KV reuse)"
    )
    p.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with")
    p.add_argument(
        "--vocab-size", type=int, default=1000, help="random prompt ids are in [10, vocab-size)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument(
        "--no-vllm-extras",
        dest="vllm_extras",
        action="store_false",
        help="do not send ignore_eos and return_token_ids (for servers that reject them)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--output", help="also write the JSON report to this file")
    p.set_defaults(func=run_serve_command)
    register_kv(subparsers)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Raises ValueError for inconsistent arguments."""
    return BenchConfig(
        base_url=args.base_url,
        num_requests=args.num_requests,
        rate=args.rate,
        concurrency=args.concurrency,
        model=args.model,
        endpoint=args.endpoint,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        dataset=args.dataset,
        vocab_size=args.vocab_size,
        seed=args.seed,
        warmup=args.warmup,
        timeout=args.timeout,
        api_key=args.api_key,
        vllm_extras=args.vllm_extras,
        turns=args.turns,
        shared_prefix=args.shared_prefix,
    )


def run_serve_command(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        run = asyncio.run(run_benchmark(config))
    except (ValueError, OSError) as e:  # bad arguments, unreadable or malformed dataset
        print(f"hetserve bench serve: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except EndpointError as e:
        print(f"hetserve bench serve: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    report = to_json(run)
    print(report if args.json else format_table(run))
    if args.output:
        Path(args.output).write_text(report + "\n", encoding="utf-8")
    return EXIT_OK if run.summary.requests_failed == 0 else EXIT_FAILED_REQUESTS
