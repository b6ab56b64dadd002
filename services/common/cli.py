"""The `hetserve` command: serve one service, run a topology, inspect layouts, benchmark, plan."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from services.common.service import configure_logging

EXIT_STARTUP_FAILED = 3


def _service(role: str):  # noqa: ANN202 - returns a Service built from its settings
    from services.common import settings as s

    if role == "gateway":
        from services.gateway.service import GatewayService

        return GatewayService(s.GatewaySettings())
    if role == "scheduler":
        from services.scheduler.worker import SchedulerService

        return SchedulerService(s.SchedulerSettings())
    if role == "prefill":
        from services.prefill.follower import PrefillFollower
        from services.prefill.worker import PrefillService

        worker = s.WorkerSettings()
        if worker.engine == "vllm":
            from services.prefill.vllm_worker import VllmPrefillService

            return VllmPrefillService(worker)
        return PrefillService(worker) if worker.tp_rank == 0 else PrefillFollower(worker)
    if role == "decode":
        from services.decode.follower import DecodeFollower
        from services.decode.worker import DecodeService

        worker = s.WorkerSettings()
        if worker.engine == "vllm":
            from services.decode.vllm_worker import VllmDecodeService

            return VllmDecodeService(worker)
        return DecodeService(worker) if worker.tp_rank == 0 else DecodeFollower(worker)
    from services.converter.worker import ConverterService

    return ConverterService(s.ConverterSettings())


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        service = _service(args.role)
    except ValueError as exc:  # pydantic ValidationError is a ValueError
        print(f"hetserve serve {args.role}: invalid settings: {exc}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    try:
        asyncio.run(service.run())
    except (ConnectionError, FileNotFoundError, ValueError) as exc:
        logging.getLogger("hetserve").error("%s failed to start: %s", args.role, exc)
        return EXIT_STARTUP_FAILED
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from services.common.launcher import run_up
    from services.common.topology import DEMO_TOPOLOGY, load_topology

    try:
        topology = load_topology(Path(args.topology) if args.topology else DEMO_TOPOLOGY)
    except ValueError as exc:
        print(f"hetserve up: {exc}", file=sys.stderr)
        return 2
    if args.model:
        topology.model = args.model
    if args.port:
        topology.gateway.port = args.port
    if not (Path(topology.model) / "config.json").exists():
        print(
            f"hetserve up: no model at {topology.model} (config.json missing); build the demo "
            "one with: hetserve model fetch (or a random tiny one with: python "
            "scripts/make_tiny_model.py models/tiny-llama)",
            file=sys.stderr,
        )
        return 2
    return run_up(topology, args.nats_url or os.environ.get("HETSERVE_NATS_URL"), args.prefix)


def cmd_layouts(args: argparse.Namespace) -> int:
    from proto.layouts import LAYOUTS

    rows = [
        {
            "name": spec.name,
            "engine": spec.engine,
            "backend": spec.backend,
            "shape": spec.describe_shape(),
            "dtypes": list(spec.dtypes),
            "block_sizes": list(spec.block_sizes),
            "source": spec.notes,
        }
        for spec in LAYOUTS.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['engine']} / {r['backend']}")
        print(
            f"{'':<{width}}  shape {r['shape']}; dtypes {', '.join(r['dtypes'])}; "
            f"block sizes {', '.join(map(str, r['block_sizes']))}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetserve", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("HETSERVE_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one service (configured by HETSERVE_* variables)")
    serve.add_argument("role", choices=["gateway", "scheduler", "prefill", "decode", "converter"])
    serve.set_defaults(func=cmd_serve)

    up = sub.add_parser("up", help="run a whole topology on this machine")
    up.add_argument("--topology", help="topology YAML (default: the built-in demo)")
    up.add_argument("--model", help="model directory (overrides the topology's)")
    up.add_argument("--nats-url", help="use this NATS server instead of an embedded one")
    up.add_argument("--port", type=int, help="gateway port (overrides the topology's)")
    up.add_argument("--prefix", default=os.environ.get("HETSERVE_PREFIX", "hetserve"))
    up.set_defaults(func=cmd_up)

    layouts = sub.add_parser("layouts", help="list the registered KV layouts")
    layouts.add_argument("--json", action="store_true")
    layouts.set_defaults(func=cmd_layouts)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from services.bench.cli import register as register_bench

    register_bench(bench_sub)
    from services.models.cli import register as register_model

    register_model(sub)
    try:
        from services.planner.cli import register as register_planner
    except ImportError:  # the planner is optional while it is being built
        register_planner = None
    if register_planner is not None:
        register_planner(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
