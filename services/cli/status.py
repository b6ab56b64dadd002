"""`hetserve status`: what a running hetserve is doing, from any machine that reaches its NATS
server. The live registry as a table (instance, role, layout, load, KV blocks, errors,
heartbeat age), the request queue depth and the errors of the last minutes; `--watch`
refreshes it, `--json` prints it for scripts (one object per refresh when watching)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from proto.messages import InstanceInfo
from services.cli.live import NoSystem, Snapshot, snapshot
from services.cli.table import format_table
from services.common.bus import Bus
from services.common.bus_users import DEFAULT_STATE_DIR, read_url
from services.common.metrics import RECENT_ERRORS_S
from services.common.settings import CommonSettings

EXIT_UNREACHABLE = 1
HEADERS = (
    "INSTANCE", "ROLE", "ENGINE", "LAYOUT", "RUNNING", "WAITING", "KV FREE/TOTAL",
    "ERRORS 5M/ALL", "HEARTBEAT",
)  # fmt: skip
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen: a refresh without curses


def register(subparsers: Any) -> None:
    status = subparsers.add_parser("status", help="what a running hetserve is doing")
    status.add_argument(
        "--nats-url",
        help="its NATS server (default: HETSERVE_NATS_URL, else the admin URL that "
        "hetserve up wrote in the state directory)",
    )
    status.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="hetserve up's (default: .hetserve)",
    )
    status.add_argument("--prefix", help="its subject prefix (default: HETSERVE_PREFIX)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    status.add_argument(
        "--connect-timeout", type=float, default=5.0, help="seconds to wait for NATS"
    )
    status.set_defaults(func=cmd_status)


def layout_cell(info: InstanceInfo) -> str:
    kv = info.kv
    if kv is None:
        return "-"
    return f"{kv.layout}/{kv.block_size} {kv.dtype}" + (
        f" tp{kv.tp_size}" if kv.tp_size > 1 else ""
    )


def instance_row(info: InstanceInfo, snap: Snapshot) -> list[str]:
    worker = info.role in ("prefill", "decode")
    age = f"{snap.age(info):.1f}s ago" + ("" if snap.is_live(info) else " (stale)")
    return [
        info.instance_id,
        info.role,
        info.engine if worker else "-",
        layout_cell(info),
        str(info.running),
        str(info.waiting),
        f"{info.free_blocks}/{info.total_blocks}" if info.total_blocks else "-",
        f"{sum(info.recent_errors.values())}/{sum(info.errors.values())}",
        age,
    ]


def render(snap: Snapshot, settings: CommonSettings) -> str:
    live = snap.live()
    roles = Counter(i.role for i in live)
    counts = ", ".join(f"{role} {n}" for role, n in roles.items()) or "none"
    lines = [
        f"hetserve at {settings.nats_url_public}, prefix {settings.prefix}: "
        f"{len(live)} live instance{'s' * (len(live) != 1)} ({counts})",
        "",
        format_table(HEADERS, [instance_row(i, snap) for i in snap.instances]),
        "",
    ]
    stale = [i.instance_id for i in snap.instances if not snap.is_live(i)]
    if stale:
        lines.append(
            f"stale (no heartbeat for {snap.ttl_s:.0f}s: stopped or hung): {', '.join(stale)}"
        )
    queue = snap.queue
    lines.append(
        f"request queue {queue.stream}: {queue.waiting} waiting for a scheduler, "
        f"{queue.placing} being placed"
        if queue
        else "request queue: no scheduler has attached to it yet"
    )
    recent = [
        f"{info.instance_id} {key} {n}"
        for info in live
        for key, n in sorted(info.recent_errors.items())
    ]
    window = f"{RECENT_ERRORS_S / 60:.0f} min"
    lines.append(f"errors in the last {window}: " + ("; ".join(recent) if recent else "none"))
    if snap.unreadable:
        lines.append(f"unreadable registry entries: {', '.join(snap.unreadable)}")
    return "\n".join(lines)


def as_json(snap: Snapshot, settings: CommonSettings) -> dict[str, Any]:
    recent: Counter[str] = Counter()
    for info in snap.live():
        recent.update(info.recent_errors)
    return {
        "nats_url": settings.nats_url_public,
        "prefix": settings.prefix,
        "taken_at": snap.taken_at,
        "instance_ttl_s": snap.ttl_s,
        "instances": [
            {
                **info.model_dump(mode="json"),
                "heartbeat_age_s": round(snap.age(info), 3),
                "live": snap.is_live(info),
            }
            for info in snap.instances
        ],
        "request_queue": (
            {
                "stream": snap.queue.stream,
                "waiting": snap.queue.waiting,
                "placing": snap.queue.placing,
            }
            if snap.queue
            else None
        ),
        "recent_errors_window_s": RECENT_ERRORS_S,
        "recent_errors": dict(recent),
        "unreadable": snap.unreadable,
    }


def settings_from(args: argparse.Namespace) -> CommonSettings:
    """The services' own settings (HETSERVE_* and .env: URL, prefix, credentials), with the
    command line's URL and prefix over them."""
    given = {"nats_url": args.nats_url, "prefix": args.prefix}
    settings = CommonSettings(**{k: v for k, v in given.items() if v})
    if not args.nats_url and "nats_url" not in settings.model_fields_set:
        settings.nats_url = read_url(args.state_dir) or settings.nats_url
    return settings


async def _show(bus: Bus, args: argparse.Namespace) -> bool:
    try:
        snap = await snapshot(bus)
    except NoSystem as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}), flush=True)
        else:
            print(f"hetserve status: {exc}", file=sys.stderr, flush=True)
        return False
    if args.json:
        print(json.dumps(as_json(snap, bus.settings), indent=None if args.watch else 2), flush=True)
    else:
        text = render(snap, bus.settings)
        if args.watch and sys.stdout.isatty():
            text = _CLEAR + text
        print(text + ("\n" if args.watch else ""), flush=True)
    return True


async def status(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    # The client retries an absent server forever, logging each try: a CLI asks once.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
    try:
        bus = await asyncio.wait_for(
            Bus.connect(settings, name="hetserve-status"), args.connect_timeout
        )
    except (TimeoutError, ConnectionError) as exc:
        print(
            f"hetserve status: cannot reach NATS at {settings.nats_url_public} within "
            f"{args.connect_timeout:.0f}s ({type(exc).__name__}); give --nats-url",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    try:
        while True:
            shown = await _show(bus, args)
            if not args.watch:
                return 0 if shown else EXIT_UNREACHABLE
            await asyncio.sleep(args.interval)
    finally:
        await bus.close()


def cmd_status(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(status(args))
    except KeyboardInterrupt:
        return 0
