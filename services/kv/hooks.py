"""What the KV library reports to the service around it, without importing it: trace headers
for outgoing frames and counts of frames sent and received (services/common wires these to
its telemetry and metrics)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _no_headers() -> dict[str, str]:
    return {}


def _ignore(*_args: object) -> None:
    pass


@dataclass(frozen=True)
class StreamHooks:
    headers: Callable[[], dict[str, str]] = _no_headers  # e.g. W3C trace context
    frame_sent: Callable[[int], None] = _ignore  # bytes on the wire
    frame_received: Callable[[int, bool], None] = _ignore  # bytes, accepted


NO_HOOKS = StreamHooks()
