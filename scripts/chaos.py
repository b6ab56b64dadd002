"""Chaos under load (docs/reliability.md): `hetserve up` on a redundant topology, `--concurrency`
streamed greedy requests at all times, and one instance of each role killed with SIGKILL, one
after another; every answer checked against transformers, every decode's blocks counted.

    python scripts/chaos.py [--topology scripts/topologies/chaos.yaml] [--concurrency 100]
        [--roles decode,prefill,converter,scheduler] [--no-restart] [--output report.json]

Exit status 0 when nothing hung, nothing was wrong, no block was stranded and at least
--min-completed of the requests completed; else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import yaml

from services.bench.chaos import KILL_ORDER, ChaosConfig, ChaosReport, chaos_on, first_server
from services.bench.system import running
from services.common.nats_server import NatsCluster

ROOT = Path(__file__).resolve().parents[1]


def passed(report: ChaosReport, min_completed: float) -> bool:
    return (
        report.hung == 0
        and report.wrong == 0
        and report.blocks_back_after_s is not None
        and report.completed_share >= min_completed
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", type=Path, default=ROOT / "scripts/topologies/chaos.yaml")
    parser.add_argument("--model", type=Path, help="overrides the topology's model")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--prompts", type=int, default=32, help="distinct prompts, cycled")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--roles", default=",".join(KILL_ORDER), help="killed in this order")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the first kill")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between kills")
    parser.add_argument("--tail", type=float, default=25.0, help="seconds after the last kill")
    parser.add_argument("--restart", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--nats-cluster",
        type=int,
        default=0,
        help="run on a NATS cluster of this many servers (JetStream replicas 3) instead of the "
        "embedded server; role 'nats' in --roles then kills its first server",
    )
    parser.add_argument("--min-completed", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write the JSON report here")
    args = parser.parse_args()

    topology = yaml.safe_load(args.topology.read_text())
    model_dir = (args.model or Path(topology["model"])).resolve()
    topology["model"] = str(model_dir)
    started = time.perf_counter()
    config = ChaosConfig.for_model(
        model_dir,
        args.prompts,
        args.max_tokens,
        args.seed,
        concurrency=args.concurrency,
        warmup_s=args.warmup,
        kill_interval_s=args.interval,
        tail_s=args.tail,
        roles=tuple(r for r in args.roles.split(",") if r),
    )
    print(
        f"transformers' tokens for {args.prompts} prompts in {time.perf_counter() - started:.1f}s"
    )
    up_args = [] if args.restart else ["--no-restart"]
    # Admission must not shed the load itself: room for every client.
    env = {"HETSERVE_MAX_INFLIGHT_REQUESTS": str(max(256, 2 * args.concurrency))}
    cluster = NatsCluster(args.nats_cluster).start() if args.nats_cluster else None
    if cluster is not None:
        env["HETSERVE_JETSTREAM_REPLICAS"] = str(min(3, args.nats_cluster))
    try:
        url = cluster.url if cluster else None
        with running(topology, env=env, up_args=up_args, nats_url=url) as system:
            victims = first_server(cluster) if cluster else None
            report = asyncio.run(
                chaos_on(system.base_url, system.admin_url, system.prefix, config, victims)
            )
            print(f"system log: {system.log_path}")
    finally:
        if cluster is not None:
            cluster.stop()
    for line in report.lines():
        print(line)
    if args.output:
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, **report.to_dict()}
        args.output.write_text(json.dumps(payload, indent=2))
    return 0 if passed(report, args.min_completed) else 1


if __name__ == "__main__":
    sys.exit(main())
