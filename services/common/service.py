"""The one skeleton every service runs on: settings -> connect -> subscribe -> serve -> drain.

A service subclass holds only its own logic: `start` (subscribe, spawn its loops),
`status` (what its heartbeat says) and `stop` (release what it holds).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar

from nats.aio.msg import Msg

from proto.messages import InstanceInfo, Role
from services.common.bus import Bus
from services.common.bus_permissions import STREAM_ROLES
from services.common.metrics import RecentErrors, record_status, serve_metrics
from services.common.registry import Registry
from services.common.settings import CommonSettings, default_instance_id
from services.common.telemetry import setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)


class Service(ABC):
    role: ClassVar[Role]
    # A follower rank of a tensor-parallel instance neither heartbeats nor answers stats:
    # its leader (rank 0) speaks for the instance.
    announces: ClassVar[bool] = True
    # prefill, decode, converter: start the KV transport's engine (mooncake) at startup
    moves_kv: ClassVar[bool] = False

    def __init__(self, settings: CommonSettings):
        if not settings.instance_id:
            settings.instance_id = default_instance_id(self.role)
        self.settings = settings
        self.instance_id = settings.instance_id
        self.started_at = time.time()
        self.bus: Bus
        self.registry: Registry
        self._tasks: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()
        self.exit_code = 0  # 1: essential work failed
        self._errors = RecentErrors()

    @abstractmethod
    async def start(self) -> None:
        """Subscribe and start loops; self.bus and self.registry are ready."""

    def status(self) -> InstanceInfo:
        errors, recent_errors = self._errors.update(time.time())
        return InstanceInfo(
            instance_id=self.instance_id,
            role=self.role,
            started_at=self.started_at,
            pid=os.getpid(),
            metrics_port=self.settings.metrics_port,
            kv_endpoint=self._kv_endpoint(),
            errors=errors,
            recent_errors=recent_errors,
        )

    def _kv_endpoint(self) -> str:
        engine = getattr(getattr(self, "bus", None), "kv_engine", None)
        return engine.session if engine is not None else ""

    async def stop(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the service holds; subscriptions are drained after this."""

    def spawn(
        self, coro: Coroutine[Any, Any, Any], name: str = "", essential: bool = False
    ) -> asyncio.Task:
        """Background work that is never silently lost: kept until done, errors logged.
        `essential` work (an engine's step loop, the request puller) that fails stops the
        service with exit status 1, for its supervisor to restart, rather than leave an
        instance that heartbeats but serves nothing."""
        task = asyncio.create_task(coro, name=name or None)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._task_done(done, essential))
        return task

    def _task_done(self, task: asyncio.Task, essential: bool) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        log.error("task %s failed", task.get_name(), exc_info=task.exception())
        if essential and not self.stopping.is_set():
            log.error("%s cannot serve without %s: stopping", self.instance_id, task.get_name())
            self.exit_code = 1
            self.stopping.set()

    async def subscribe(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]], queue: str = ""
    ) -> None:
        """Every handler gets one error boundary: a failure is logged, never kills the service."""

        async def guarded(msg: Msg) -> None:
            try:
                await handler(msg)
            except Exception:
                log.exception("%s: handler for %s failed", self.instance_id, msg.subject)

        await self.bus.nc.subscribe(
            subject, queue=queue, cb=guarded, pending_bytes_limit=-1, pending_msgs_limit=-1
        )

    async def _heartbeat(self) -> None:
        while not self.stopping.is_set():
            try:
                info = self.status()
                record_status(info)
                await self.registry.announce(info)
            except Exception as exc:  # noqa: BLE001 - NATS reconnecting: try again next beat
                log.warning("heartbeat failed: %s", exc)
            try:
                await asyncio.wait_for(self.stopping.wait(), self.settings.heartbeat_interval_s)
            except TimeoutError:
                pass

    async def _stats(self, msg: Msg) -> None:
        await msg.respond(self.status().pack())

    async def run(self) -> None:
        """Run until SIGINT/SIGTERM (or `stopping` is set), then shut down in order."""
        setup_tracing(self.role, self.instance_id)
        stop_metrics = serve_metrics(self.settings.metrics_port) if self.announces else None
        self.bus = await Bus.connect(self.settings, name=self.instance_id)
        if self.role in STREAM_ROLES:
            await self.bus.ensure_streams()
        if self.moves_kv:
            await self.bus.start_kv_transport()
        self.registry = Registry(self.bus, self.settings.instance_ttl_s)
        await self.registry.start()
        await self.start()
        if self.announces:
            await self.subscribe(self.bus.subjects.stats(self.instance_id), self._stats)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        heartbeat = asyncio.create_task(self._heartbeat()) if self.announces else None
        log.info("%s ready", self.instance_id)
        await self.stopping.wait()
        log.info("%s stopping", self.instance_id)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if heartbeat is not None:
            heartbeat.cancel()
            await self.registry.withdraw(self.instance_id)
        await self.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.registry.stop()
        await self.bus.close()
        shutdown_tracing()
        if stop_metrics is not None:
            stop_metrics()


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
