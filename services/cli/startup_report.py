"""What `hetserve up` tells the operator while a topology starts: a progress line every few
seconds while models load (who is ready, who is still loading, who exited), then, once every
instance has announced itself in the registry, one summary: a row per instance (role,
engine, layout, block size, dtype, TP, device, pid, metrics port) and how each prefill ->
decode pair sends its KV (direct or via the converter)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Protocol, TextIO

from proto.messages import InstanceInfo
from services.cli.table import format_table
from services.cli.topology import ALWAYS, Topology
from services.common.bus import Bus
from services.common.registry import Registry
from services.common.settings import CommonSettings
from services.scheduler.policy import pairable

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0  # a progress line at least this often while nothing changes
PROGRESS_GAP_S = 2.0  # and never more often than this
SUMMARY_HEADERS = (
    "INSTANCE", "ROLE", "ENGINE", "LAYOUT", "BLOCK", "DTYPE", "TP", "DEVICE", "PID", "METRICS",
)  # fmt: skip


class Started(Protocol):
    """A process the launcher started (launcher.Instance)."""

    env: dict[str, str]
    process: subprocess.Popen | None


def live_route(prefill: InstanceInfo, decode: InstanceInfo) -> str:
    """The scheduler's rule (services/scheduler/policy.py) on two announced descriptors."""
    if prefill.kv is None or decode.kv is None or not pairable(prefill, decode):
        return "cannot pair (different model geometry)"
    if prefill.kv.same_kv_as(decode.kv):
        return "direct"
    return "via the converter"


def _kv_words(info: InstanceInfo) -> str:
    kv = info.kv
    return f"{kv.layout}/{kv.block_size} {kv.dtype} tp{kv.tp_size}" if kv else "?"


class StartupReport:
    """Follows the registry from a thread (its own event loop and NATS connection) while the
    launcher's loop calls `tick()`, which prints when a line is due."""

    def __init__(
        self,
        instances: list[Started],
        topology: Topology,
        nats_url: str,
        prefix: str,
        state_dir: Path | None = None,
        out: TextIO | None = None,
    ):
        """`state_dir`: where the embedded server's credentials are (None: a given server)."""
        self.topology = topology
        self.state_dir = state_dir
        self.settings = CommonSettings(nats_url=nats_url, prefix=prefix)
        self.out = out or sys.stdout
        # every id that announces itself, with its processes (a native TP instance has one
        # per rank; rank 0 announces)
        self.expected: dict[str, list[Started]] = {}
        for inst in instances:
            self.expected.setdefault(inst.env["HETSERVE_INSTANCE_ID"], []).append(inst)
        self.started = time.monotonic()
        self.done = False
        self._entries: dict[str, InstanceInfo] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="startup-report", daemon=True)
        self._last_line_at = 0.0
        self._last_ready: frozenset[str] | None = None

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    # -- the launcher's thread -----------------------------------------------------------

    def ready(self) -> dict[str, InstanceInfo]:
        """Expected instances whose live registry entry is one of our processes' (an entry
        left by an earlier run under the same prefix does not count)."""
        with self._lock:
            entries = dict(self._entries)
        out = {}
        for instance_id, procs in self.expected.items():
            info = entries.get(instance_id)
            pids = {p.process.pid for p in procs if p.process is not None}
            if info is not None and info.pid in pids:
                out[instance_id] = info
        return out

    def tick(self) -> None:
        if self.done:
            return
        ready = self.ready()
        if len(ready) == len(self.expected):
            self.done = True
            self._print(self.summary(ready))
            self._stop.set()  # nothing more to follow
            return
        now = time.monotonic()
        changed = frozenset(ready) != self._last_ready
        since = now - self._last_line_at
        if self._last_ready is None or (changed and since >= PROGRESS_GAP_S):
            self._progress(ready, now)
        elif since >= PROGRESS_EVERY_S:
            self._progress(ready, now)

    def _progress(self, ready: dict[str, InstanceInfo], now: float) -> None:
        self._last_ready = frozenset(ready)
        self._last_line_at = now
        self._print(self.progress_line(ready, now))

    def progress_line(self, ready: dict[str, InstanceInfo], now: float) -> str:
        waiting = []
        for instance_id, procs in self.expected.items():
            if instance_id in ready:
                continue
            codes = [p.process.poll() for p in procs if p.process is not None]
            exited = [c for c in codes if c is not None]
            state = f"exited with code {exited[0]}" if exited else "loading"
            waiting.append(f"{instance_id} ({state})")
        return (
            f"hetserve up: {len(ready)}/{len(self.expected)} instances ready after "
            f"{now - self.started:.0f}s; waiting for {', '.join(waiting)}"
        )

    def summary(self, ready: dict[str, InstanceInfo]) -> str:
        rows = [self._row(ready[i], self.expected[i]) for i in self.expected]
        lines = [
            f"hetserve up: all {len(ready)} instances ready in "
            f"{time.monotonic() - self.started:.1f}s",
            format_table(SUMMARY_HEADERS, rows, indent="  "),
        ]
        prefills = [i for i in ready.values() if i.role == "prefill"]
        decodes = [i for i in ready.values() if i.role == "decode"]
        lines.append("KV routes (prefill -> decode):")
        for p in prefills:
            for d in decodes:
                route = live_route(p, d)
                lines.append(
                    f"  {p.instance_id} -> {d.instance_id}: {route} "
                    f"({_kv_words(p)} -> {_kv_words(d)})"
                )
        for d in decodes:
            if d.local_prefill_max_tokens >= ALWAYS:
                lines.append(f"  {d.instance_id}: prefills every prompt it decodes (both)")
            elif d.local_prefill_max_tokens:
                lines.append(
                    f"  {d.instance_id}: prefills prompts of up to "
                    f"{d.local_prefill_max_tokens} uncached tokens itself"
                )
        gateway = self.topology.gateway
        for i in range(gateway.replicas):
            lines.append(
                f"OpenAI API: http://{gateway.host}:{gateway.port + i}/v1 "
                "(also /health and /metrics)"
            )
        where = (
            f"--state-dir {self.state_dir}"
            if self.state_dir is not None
            else f"--nats-url {self.settings.nats_url_public}"
        )
        lines.append(
            f"what is running: hetserve status {where} --prefix {self.settings.prefix} [--watch]"
        )
        return "\n".join(lines)

    def _row(self, info: InstanceInfo, procs: list[Started]) -> list[str]:
        kv = info.kv
        pids = ",".join(str(p.process.pid) for p in procs if p.process is not None)
        metrics = str(info.metrics_port) if info.metrics_port else "-"
        if info.role == "gateway" and not info.metrics_port:
            metrics = f"{procs[0].env.get('HETSERVE_PORT', '?')} (API port)"
        return [
            info.instance_id,
            info.role,
            info.engine if kv else "-",
            kv.layout if kv else "-",
            str(kv.block_size) if kv else "-",
            kv.dtype if kv else "-",
            str(kv.tp_size) if kv else "-",
            info.device or "-",
            pids or str(info.pid),
            metrics,
        ]

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- the follower thread ---------------------------------------------------------------

    def _follow(self) -> None:
        try:
            asyncio.run(self._follow_registry())
        except Exception as exc:  # noqa: BLE001 - the report is a courtesy; serving goes on
            log.warning("start-up report stopped: %s", exc)

    async def _follow_registry(self) -> None:
        bus = await Bus.connect(self.settings, name="hetserve-up")
        registry = Registry(bus, self.settings.instance_ttl_s)
        await registry.start()
        try:
            while not self._stop.is_set():
                live = {info.instance_id: info for info in registry.live()}
                with self._lock:
                    self._entries = live
                await asyncio.sleep(0.5)
        finally:
            await registry.stop()
            await bus.close()
