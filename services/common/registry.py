"""The live instance registry: a JetStream KV bucket of heartbeats, mirrored in memory.

An entry is live while its heartbeat is younger than the TTL; a dead process stops
heartbeating and drops out, a stopping one deletes its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from nats.js.kv import KeyValue

from proto.messages import InstanceInfo, MessageError, Role
from services.common import metrics
from services.common.bus import Bus

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, bus: Bus, ttl_s: float):
        self.bus = bus
        self.ttl_s = ttl_s
        # With no update for this long (every instance heartbeats each second) the watch is
        # presumed lost (its NATS server died, its consumer with it) and made anew: half the
        # TTL, so entries come back before they expire.
        self.stale_s = 0.5 * ttl_s
        self.entries: dict[str, InstanceInfo] = {}
        self._kv: KeyValue | None = None
        self._watch_task: asyncio.Task | None = None
        self._guard_task: asyncio.Task | None = None
        self._last_update = time.time()
        # since when the watch is lost and not yet made anew: entries are judged as of then
        # (cut off from the bus, the registry does not know them dead), not expired by it
        self._blind_since: float | None = None

    async def start(self) -> None:
        self._kv = await self.bus.registry_bucket()
        await self._start_watch()
        self._guard_task = asyncio.create_task(self._guard())

    async def _start_watch(self) -> None:
        assert self._kv is not None
        watcher = await self._kv.watchall()
        self._last_update = time.time()
        self._watch_task = asyncio.create_task(self._watch(watcher))

    async def _guard(self) -> None:
        quiet = False  # made anew and still no update: nothing heartbeats, the watch is fine
        while True:
            await asyncio.sleep(min(1.0, self.stale_s / 2))
            if time.time() - self._last_update < self.stale_s:
                quiet = False
                continue
            if self._blind_since is None:
                self._blind_since = self._last_update
            level = logging.DEBUG if quiet else logging.WARNING
            log.log(level, "no registry update for %.1fs: watching it anew", self.stale_s)
            if self._watch_task is not None:
                self._watch_task.cancel()
            try:
                await self._start_watch()
            except Exception as exc:  # noqa: BLE001 - the server may be electing a leader
                log.warning("watching the registry anew failed (trying again): %s", exc)
                continue
            self._blind_since = None  # the bus answers: what the watch shows now is so
            quiet = True

    async def _watch(self, watcher) -> None:  # noqa: ANN001
        try:
            async for entry in watcher:
                self._last_update, self._blind_since = time.time(), None  # current again
                if entry is None:  # end of the initial values
                    continue
                if entry.operation in ("DEL", "PURGE"):
                    self.entries.pop(entry.key, None)
                    continue
                try:
                    self.entries[entry.key] = InstanceInfo.unpack(entry.value)
                except MessageError as exc:
                    log.warning("ignoring registry entry %s: %s", entry.key, exc)
                    metrics.error("registry", "malformed_entry")
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def is_live(self, info: InstanceInfo, now: float | None = None) -> bool:
        now = now or time.time()
        if self._blind_since is not None:
            now = min(now, self._blind_since + self.stale_s)
        return now - info.heartbeat_at < self.ttl_s

    def live(self, role: Role | None = None) -> list[InstanceInfo]:
        now = time.time()
        return [
            info
            for info in self.entries.values()
            if (role is None or info.role == role) and self.is_live(info, now)
        ]

    def get(self, instance_id: str) -> InstanceInfo | None:
        info = self.entries.get(instance_id)
        return info if info is not None and self.is_live(info) else None

    async def announce(self, info: InstanceInfo) -> None:
        assert self._kv is not None, "start() first"
        info.heartbeat_at = time.time()
        await self._kv.put(info.instance_id, info.pack())

    async def withdraw(self, instance_id: str) -> None:
        if self._kv is not None:
            try:
                await self._kv.delete(instance_id)
            except Exception as exc:  # noqa: BLE001 - shutting down; the TTL covers us
                log.debug("withdraw %s: %s", instance_id, exc)

    async def stop(self) -> None:
        for task in (self._guard_task, self._watch_task):
            if task is not None:
                task.cancel()
