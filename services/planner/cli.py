"""`hetserve plan`, `hetserve gpus` and `hetserve profile`: registered on the project's CLI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from services.planner.catalog import builtin_catalog
from services.planner.errors import PlannerError
from services.planner.spec import load_spec

EXIT_BAD_INPUT = 2


def register(subparsers: Any) -> None:
    """Add `plan`, `gpus` and `profile` to an argparse sub-parser collection."""
    plan = subparsers.add_parser("plan", help="choose GPU types, parallelism and counts per phase")
    plan.add_argument("spec", type=Path, help="YAML or JSON plan spec")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--rate", type=float, help="override workload.rate (requests/s)")
    plan.add_argument("--compose", action="store_true", help="print the compose scale numbers")
    plan.add_argument("--topology", type=Path, help="write the topology as YAML to this file")
    plan.add_argument("--plot", type=Path, help="write a PNG of cost against arrival rate")
    plan.add_argument("--no-simulate", action="store_true", help="skip the simulation checks")
    plan.add_argument("--no-baselines", action="store_true", help="skip the baselines")
    plan.add_argument(
        "--check-baselines",
        action="store_true",
        help="simulate every baseline, also those whose estimate cannot beat the plan",
    )
    plan.set_defaults(func=run_plan)

    gpus = subparsers.add_parser("gpus", help="list the built-in accelerator catalog")
    gpus.add_argument("--json", action="store_true", help="print the catalog as JSON")
    gpus.set_defaults(func=run_gpus)

    profile = subparsers.add_parser(
        "profile", help="time the native engine here and fit the performance model to it"
    )
    profile.add_argument("--model", type=Path, default=Path("models/tiny-llama"), help="model dir")
    profile.add_argument("--out", type=Path, help="profile file (default profiles/<name>.json)")
    profile.add_argument("--name", help="catalog name of this device (default cpu-<model>)")
    profile.add_argument("--device", default="cpu", help="torch device to time (cpu, cuda)")
    profile.add_argument("--hidden", type=int, help="time a random model this wide instead")
    profile.add_argument("--layers", type=int, help="... with this many layers")
    profile.add_argument("--repeats", type=int, default=3, help="timings per grid point and pass")
    profile.add_argument("--passes", type=int, default=3, help="times the whole grid is timed")
    profile.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    profile.add_argument("--quick", action="store_true", help="a small grid (for tests)")
    profile.set_defaults(func=run_profile)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_plan(args: argparse.Namespace) -> int:
    from services.planner.inputs import resolve
    from services.planner.planner import plan
    from services.planner.plot import plot_costs
    from services.planner.report import to_json, to_table
    from services.planner.topology import (
        compose_command,
        scale_numbers,
        topology,
    )

    try:
        if args.rate is not None and args.rate <= 0:
            raise PlannerError(f"--rate must be > 0 (got {args.rate:g})")
        inputs = resolve(load_spec(args.spec))
        if args.rate is not None:
            inputs = inputs.with_rate(args.rate)
        report = plan(
            inputs,
            simulate=not args.no_simulate,
            baselines=not args.no_baselines,
            check_baselines=args.check_baselines,
        )
        if args.plot is not None:
            plot_costs(inputs, args.plot)
        if args.topology is not None and report.plan.feasible:
            try:
                args.topology.write_text(
                    yaml.safe_dump(topology(report.plan, inputs.model.name), sort_keys=False)
                )
            except OSError as exc:
                raise PlannerError(
                    f"--topology: cannot write {args.topology}: {exc.strerror}"
                ) from None
    except PlannerError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps(to_json(report), indent=2))
    else:
        print(to_table(report))
    if args.compose and report.plan.feasible:
        numbers = scale_numbers(report.plan)
        scale = ", ".join(f"{role}={n}" for role, n in sorted(numbers.items()))
        lines = [f"scale: {scale}"]
        if "both" in numbers:
            lines.append(
                "both: colocated instances (prefill and decode in one engine): compose's "
                "`both` service, a topology's `both:` workers"
            )
        lines.append(compose_command(report.plan))
        print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
    return 0 if report.plan.feasible else 1


def run_gpus(args: argparse.Namespace) -> int:
    catalog = builtin_catalog()
    if args.json:
        print(json.dumps([gpu.model_dump() for gpu in catalog.values()], indent=2))
        return 0
    headers = ("name", "vendor", "TFLOP/s bf16", "dense", "HBM GB/s", "GB", "link GB/s", "source")
    rows = [
        (
            g.name,
            g.vendor,
            f"{g.tflops_bf16:g}",
            "yes" if g.dense else "no",
            f"{g.hbm_gbps:g}",
            f"{g.memory_gb:g}",
            f"{g.link_gbps:g}",
            g.source,
        )
        for g in catalog.values()
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for line in (headers, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return 0


def run_profile(args: argparse.Namespace) -> int:
    from services.planner.calibrate import profile_engine

    try:
        profile, path = profile_engine(
            model_dir=args.model,
            device=args.device,
            name=args.name,
            out=args.out,
            hidden=args.hidden,
            layers=args.layers,
            repeats=args.repeats,
            passes=args.passes,
            threads=args.threads,
            quick=args.quick,
        )
    except PlannerError as exc:
        return _fail(str(exc))
    mape = ", ".join(f"{phase} {value:.1%}" for phase, value in profile.mape.items())
    eff = profile.gpu.efficiency
    print(
        f"profiled {profile.device} with {profile.engine} on {profile.model.name}: "
        f"{len(profile.measurements)} timings; held-out MAPE {mape}\n"
        f"fitted: compute {eff.compute:.3f}, memory {eff.memory:.3f}, attention "
        f"{eff.attention:.3f}, layer overhead {eff.layer_overhead_s * 1e6:.1f} us\n"
        f"conditions: {profile.conditions}\nwritten to {path}"
    )
    return 0
