"""`hetserve check TOPOLOGY`: the checks `hetserve up` runs before it starts anything, alone
(CI runs it on every topology the repo ships). Exit 0: fine; 2: problems, one line each."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from services.cli.preflight import Report, check_topology
from services.cli.preflight.report import PlannedPair
from services.cli.topology import DEMO_TOPOLOGY

EXIT_PROBLEMS = 2
_ROUTE_WORDS = {
    "direct": "direct",
    "converter": "via the converter",
    "unpairable": "cannot pair (different model geometry)",
    "unknown": "decided when vLLM allocates its cache",
}


def register(subparsers: Any) -> None:
    check = subparsers.add_parser(
        "check", help="validate a topology as `hetserve up` would, starting nothing"
    )
    check.add_argument("topology", nargs="?", help="topology YAML (default: the built-in demo)")
    check.add_argument("--model", help="model directory (overrides the topology's)")
    check.add_argument("--port", type=int, help="gateway port (overrides the topology's)")
    check.add_argument(
        "--no-ports", action="store_true", help="leave this machine's ports unchecked"
    )
    check.add_argument("--json", action="store_true", help="the report as JSON")
    check.set_defaults(func=cmd_check)


def route_line(pair: PlannedPair) -> str:
    return f"{pair.prefill.name} -> {pair.decode.name}: {_ROUTE_WORDS[pair.route]}"


def plan_lines(report: Report) -> list[str]:
    """The instances an ok topology starts and how their KV will travel."""
    lines = [
        f"  {w.field} {w.name}: {w.engine}, {w.describe_kv()} -> {', '.join(w.instance_ids)}"
        for w in report.workers
    ]
    return lines + [f"  route {route_line(pair)}" for pair in report.pairs]


def cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.topology) if args.topology else DEMO_TOPOLOGY
    _, report = check_topology(path, model=args.model, port=args.port, ports=not args.no_ports)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0 if report.ok else EXIT_PROBLEMS
    for line in report.lines():
        print(line)
    if not report.ok:
        count = len(report.problems)
        print(f"{path}: {count} problem{'s' * (count != 1)}; hetserve up would start nothing")
        return EXIT_PROBLEMS
    print(f"{path}: ok")
    for line in plan_lines(report):
        print(line)
    return 0
