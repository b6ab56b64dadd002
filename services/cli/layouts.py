"""`hetserve layouts`: the registered KV layouts."""

from __future__ import annotations

import argparse
import json
from typing import Any

from proto.layout_registry import LAYOUTS


def register(subparsers: Any) -> None:
    layouts = subparsers.add_parser("layouts", help="list the registered KV layouts")
    layouts.add_argument("--json", action="store_true")
    layouts.set_defaults(func=cmd_layouts)


def cmd_layouts(args: argparse.Namespace) -> int:
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
