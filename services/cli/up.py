"""`hetserve up`: a whole topology on this machine (services/cli/launcher.py runs it), once
the topology passed every check of services/cli/preflight."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from services.cli.launcher import run_up
from services.cli.preflight import check_topology
from services.cli.topology import DEMO_TOPOLOGY
from services.common.bus_users import DEFAULT_STATE_DIR

EXIT_REFUSED = 2


def register(subparsers: Any) -> None:
    up = subparsers.add_parser("up", help="run a whole topology on this machine")
    up.add_argument("--topology", help="topology YAML (default: the built-in demo)")
    up.add_argument("--model", help="model directory (overrides the topology's)")
    up.add_argument("--nats-url", help="use this NATS server instead of an embedded one")
    up.add_argument("--port", type=int, help="gateway port (overrides the topology's)")
    up.add_argument("--prefix", default=os.environ.get("HETSERVE_PREFIX", "hetserve"))
    up.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="where the embedded NATS server's per-role URLs go (default: .hetserve)",
    )
    up.add_argument(
        "--api-key",
        help="API key(s) the gateways require, comma-separated (or set HETSERVE_API_KEY)",
    )
    up.add_argument(
        "--restart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start an instance that died again, with backoff (default: on)",
    )
    up.set_defaults(func=cmd_up)


def cmd_up(args: argparse.Namespace) -> int:
    path = Path(args.topology) if args.topology else DEMO_TOPOLOGY
    topology, report = check_topology(path, model=args.model, port=args.port)
    for line in report.lines():
        print(line, file=sys.stderr)
    if topology is None or not report.ok:
        count = len(report.problems)
        print(
            f"hetserve up: {count} problem{'s' * (count != 1)} in {path}; nothing was started",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    gateway_env = {"HETSERVE_API_KEY": args.api_key} if args.api_key else {}
    nats_url = args.nats_url or os.environ.get("HETSERVE_NATS_URL")
    return run_up(topology, nats_url, args.prefix, gateway_env, args.state_dir, args.restart)
