"""`hetserve serve ROLE`: one service, configured by its HETSERVE_* settings.

The composition root: `ROLES` says which service (and which engine behind it) a role and its
settings make; only this module knows every service.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

from proto.messages import ROLES as ROLE_NAMES
from services.common import settings as s
from services.common.service import Service

EXIT_STARTUP_FAILED = 3


def _gateway() -> Service:
    from services.gateway.service import GatewayService

    return GatewayService(s.GatewaySettings())


def _scheduler() -> Service:
    from services.scheduler.worker import SchedulerService

    return SchedulerService(s.SchedulerSettings())


def _prefill() -> Service:
    from services.prefill.worker import PrefillService

    worker = s.WorkerSettings()
    if worker.engine == "vllm":
        from services.backends.vllm.prefill import VllmPrefill

        return PrefillService(worker, VllmPrefill(worker))
    if worker.tp_rank > 0:  # vLLM starts its own rank processes; native ranks are ours
        from services.prefill.follower import PrefillFollower

        return PrefillFollower(worker)
    from services.backends.native.prefill import NativePrefill

    return PrefillService(worker, NativePrefill(worker))


def _decode() -> Service:
    from services.decode.worker import DecodeService

    worker = s.WorkerSettings()
    if worker.engine == "vllm":
        from services.backends.vllm.decode import VllmDecode

        return DecodeService(worker, VllmDecode(worker))
    if worker.tp_rank > 0:
        from services.decode.follower import DecodeFollower

        return DecodeFollower(worker)
    from services.backends.native.decode import NativeDecode

    return DecodeService(worker, NativeDecode(worker))


def _converter() -> Service:
    from services.converter.worker import ConverterService

    return ConverterService(s.ConverterSettings())


# Imports stay inside the factories: a gateway process never loads torch or vLLM.
ROLES: dict[str, Callable[[], Service]] = {
    "gateway": _gateway,
    "scheduler": _scheduler,
    "prefill": _prefill,
    "decode": _decode,
    "converter": _converter,
}
assert tuple(ROLES) == ROLE_NAMES


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser("serve", help="run one service (configured by HETSERVE_*)")
    serve.add_argument("role", choices=list(ROLES))
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        service = ROLES[args.role]()
    except ValueError as exc:  # pydantic ValidationError is a ValueError
        print(f"hetserve serve {args.role}: invalid settings: {exc}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    try:
        asyncio.run(service.run())
    except (ConnectionError, FileNotFoundError, ValueError) as exc:
        logging.getLogger("hetserve").error("%s failed to start: %s", args.role, exc)
        return EXIT_STARTUP_FAILED
    return service.exit_code
