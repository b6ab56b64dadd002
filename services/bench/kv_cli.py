"""`hetserve bench kv` arguments. Heavy imports (torch, the services) wait for the command.

Exit codes: 0 the run completed (targets met or not: the report says), 2 bad arguments,
3 the services or NATS did not start, 1 a measurement failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from services.common.settings import CommonSettings

_SERVICE_DEFAULTS = CommonSettings.model_fields

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG, EXIT_NO_SERVICES = 0, 1, 2, 3


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas: {text!r}"
        ) from None


def _pair(text: str) -> tuple[str, str]:
    a, sep, b = text.partition(":")
    if not sep or not a or not b:
        raise argparse.ArgumentTypeError(f"expected A:B, got {text!r}")
    return a, b


def _int_pair(text: str) -> tuple[int, int]:
    a, b = _pair(text)
    try:
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers P:D, got {text!r}") from None


def register(subparsers: Any) -> None:
    """Add `kv` to the `bench` command's subparsers."""
    p = subparsers.add_parser(
        "kv",
        help="KV conversion, transfer and exposed-transfer benchmark",
        description="In one run: (a) convert_layer throughput per layout pair vs a torch "
        "clone; (b) KV goodput direct and via the converter vs the raw NATS ceiling; "
        "(c) transfer left exposed after the real prefill worker's compute.",
    )
    env = os.environ.get
    p.add_argument(
        "--sections",
        type=_names,
        default=("convert", "transfer", "exposed"),
        help="which parts to run (default: convert,transfer,exposed)",
    )
    a = p.add_argument_group("(a) conversion")
    a.add_argument("--layouts", type=_names, default=(), help="layouts to pair (default: all)")
    a.add_argument(
        "--dtypes",
        default="bfloat16,float32",
        help="'dtype' or 'source:target' items (default %(default)s)",
    )
    a.add_argument("--tokens", type=_ints, default=(2048,), help="tokens per layer, e.g. 1024,4096")
    a.add_argument("--kv-heads", type=int, default=8)
    a.add_argument("--head-dim", type=int, default=128)
    a.add_argument("--tp", type=_int_pair, default=(1, 1), help="source:target TP (default 1:1)")
    a.add_argument("--repeats", type=int, default=7, help="timed rounds per case (best of)")
    a.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    b = p.add_argument_group("(b) transfer and (c) exposed transfer")
    b.add_argument(
        "--nats-url",
        default=env("HETSERVE_BENCH_NATS_URL"),
        help="use this server (env HETSERVE_BENCH_NATS_URL; default: embedded)",
    )
    b.add_argument("--model", help="model directory (default: build the tiny Llama)")
    b.add_argument(
        "--route",
        type=_pair,
        default=("vllm-flash", "ascend"),
        help="prefill layout:converted-to layout (default vllm-flash:ascend)",
    )
    b.add_argument("--service-dtype", default="float32", help="KV dtype of the services")
    b.add_argument(
        "--frame-bytes",
        type=int,
        default=_SERVICE_DEFAULTS["max_frame_bytes"].default,
        help="max KV frame bytes (default: the services' default)",
    )
    b.add_argument(
        "--window",
        type=int,
        default=_SERVICE_DEFAULTS["kv_window"].default,
        help="unacknowledged frames per stream (default: the services' default)",
    )
    b.add_argument(
        "--transport",
        type=_names,
        default=("nats",),
        help="KV transports to measure (b) and (c) on, e.g. nats,mooncake (default nats)",
    )
    b.add_argument("--transfer-tokens", type=int, help="tokens per request (default: auto)")
    b.add_argument(
        "--transfer-requests",
        type=int,
        default=40,
        help="requests per route, the routes taking turns (default %(default)s)",
    )
    b.add_argument("--prompt-tokens", type=int, default=1024, help="(c) prompt length")
    b.add_argument("--exposed-repeats", type=int, default=5, help="(c) prompts per route")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--output", help="also write the JSON report to this file")
    p.set_defaults(func=run_kv_command)


def run_kv_command(args: argparse.Namespace) -> int:
    from services.bench.kv import KVBenchConfig, run_kv_bench
    from services.bench.kv_report import format_table, to_json
    from services.bench.kv_services import ServicesFailed

    config = KVBenchConfig(
        sections=args.sections,
        layouts=args.layouts,
        dtypes=args.dtypes,
        tokens=args.tokens,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        tp=args.tp,
        repeats=args.repeats,
        threads=args.threads,
        nats_url=args.nats_url,
        model=args.model,
        route=args.route,
        service_dtype=args.service_dtype,
        max_frame_bytes=args.frame_bytes,
        window=args.window,
        transfer_tokens=args.transfer_tokens,
        transfer_requests=args.transfer_requests,
        prompt_tokens=args.prompt_tokens,
        exposed_repeats=args.exposed_repeats,
        transports=args.transport,
    )
    try:
        config.check()
    except ValueError as exc:
        print(f"hetserve bench kv: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        report = run_kv_bench(config)
    except (ServicesFailed, ConnectionError, FileNotFoundError) as exc:
        print(f"hetserve bench kv: could not start: {exc}", file=sys.stderr)
        return EXIT_NO_SERVICES
    except (RuntimeError, ValueError) as exc:
        print(f"hetserve bench kv: {exc}", file=sys.stderr)
        return EXIT_FAILED
    text = to_json(report)
    print(text if args.json else format_table(report))
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return EXIT_OK
