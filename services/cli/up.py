"""`hetserve up`: a whole topology on this machine (services/cli/launcher.py runs it)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from services.cli.launcher import run_up
from services.cli.topology import DEMO_TOPOLOGY, load_topology


def register(subparsers: Any) -> None:
    up = subparsers.add_parser("up", help="run a whole topology on this machine")
    up.add_argument("--topology", help="topology YAML (default: the built-in demo)")
    up.add_argument("--model", help="model directory (overrides the topology's)")
    up.add_argument("--nats-url", help="use this NATS server instead of an embedded one")
    up.add_argument("--port", type=int, help="gateway port (overrides the topology's)")
    up.add_argument("--prefix", default=os.environ.get("HETSERVE_PREFIX", "hetserve"))
    up.add_argument(
        "--api-key",
        help="API key(s) the gateways require, comma-separated (or set HETSERVE_API_KEY)",
    )
    up.set_defaults(func=cmd_up)


def cmd_up(args: argparse.Namespace) -> int:
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
            "one with: hetserve model fetch (or a random tiny one with: hetserve model tiny "
            "models/tiny-llama)",
            file=sys.stderr,
        )
        return 2
    gateway_env = {"HETSERVE_API_KEY": args.api_key} if args.api_key else {}
    return run_up(
        topology, args.nats_url or os.environ.get("HETSERVE_NATS_URL"), args.prefix, gateway_env
    )
