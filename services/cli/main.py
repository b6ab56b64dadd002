"""The `hetserve` command: serve one service, run or check a topology, see what runs, inspect
layouts, benchmark, plan."""

from __future__ import annotations

import argparse
import os
import sys

from services.bench.cli import register as register_bench
from services.cli import bus_config, check, layouts, serve, status, up
from services.common.service import configure_logging
from services.models.cli import register as register_model
from services.planner.cli import register as register_planner


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetserve", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("HETSERVE_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)
    serve.register(sub)
    up.register(sub)
    check.register(sub)
    status.register(sub)
    bus_config.register(sub)
    layouts.register(sub)
    bench = sub.add_parser("bench", help="benchmarks")
    register_bench(bench.add_subparsers(dest="bench_command", required=True))
    register_planner(sub)
    register_model(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
