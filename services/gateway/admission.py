"""Admission control: at most `max_inflight` requests in the system, at most `max_queued`
waiting in the gateway for a slot (first come, first served), each for at most
`max_queue_wait_s`, and, with API keys, at most `max_per_key` requests of one key in the
gateway at once. Whatever is not admitted is shed at once with a status and a Retry-After:

- 429 `queue_full`: every slot is taken and the queue is full;
- 429 `key_limit`: this key already has `max_per_key` requests in the gateway;
- 503 `queue_timeout`: the request waited `max_queue_wait_s` without getting a slot;
- 503 `no_capacity` (decided by the HTTP layer): no instance of a role every request needs.

A shed request costs the gateway nothing but its answer, so memory stays bounded by the two
limits (and the request body limit) however hard clients push.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from services.common import metrics

_MAX_RETRY_AFTER_S = 60


class Shed(Exception):
    """A request the gateway will not serve now; the client may retry after `retry_after` s."""

    def __init__(self, status: int, reason: str, message: str, retry_after: int):
        super().__init__(message)
        self.status = status
        self.reason = reason  # short fixed word: the metric label and the error code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class AdmissionLimits:
    max_inflight: int
    max_queued: int
    max_queue_wait_s: float
    max_per_key: int = 0  # 0: no per-key limit


class Admission:
    def __init__(self, limits: AdmissionLimits):
        self.limits = limits
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._per_key: dict[str, int] = {}
        # Mean time a request holds its slot (moving average): what Retry-After is made of.
        self._hold_s = 1.0

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for a request that joins the queue's end."""
        ahead = self.queued + 1
        estimate = self._hold_s * ahead / self.limits.max_inflight
        return min(_MAX_RETRY_AFTER_S, max(1, math.ceil(estimate)))

    def shed(self, status: int, reason: str, message: str, retry_after: int | None = None) -> Shed:
        """Count a shed request and build its answer."""
        metrics.SHED_REQUESTS.labels(reason).inc()
        return Shed(status, reason, message, retry_after or self.retry_after())

    @asynccontextmanager
    async def slot(self, tenant: str | None = None) -> AsyncIterator[None]:
        """Hold one in-flight slot for the block; raises Shed when none can be had."""
        self._count_tenant(tenant)
        try:
            waited = await self._acquire()
            metrics.ADMISSION_WAIT.observe(waited)
            started = time.monotonic()
            try:
                yield
            finally:
                self._release()
                self._hold_s = 0.9 * self._hold_s + 0.1 * (time.monotonic() - started)
        finally:
            if tenant is not None:
                self._per_key[tenant] -= 1
                if not self._per_key[tenant]:
                    del self._per_key[tenant]

    def _count_tenant(self, tenant: str | None) -> None:
        if tenant is None:
            return
        held = self._per_key.get(tenant, 0)
        if self.limits.max_per_key and held >= self.limits.max_per_key:
            raise self.shed(
                429,
                "key_limit",
                f"This API key already has {held} requests in progress, the most one key may "
                "have at once; retry when one has finished",
            )
        self._per_key[tenant] = held + 1

    async def _acquire(self) -> float:
        """Seconds waited for the slot."""
        if self.inflight < self.limits.max_inflight and not self._waiters:
            self.inflight += 1
            return 0.0
        if len(self._waiters) >= self.limits.max_queued:
            raise self.shed(
                429,
                "queue_full",
                f"The server is at capacity ({self.limits.max_inflight} requests in progress, "
                f"{len(self._waiters)} waiting); retry later",
            )
        began = time.monotonic()
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            async with asyncio.timeout(self.limits.max_queue_wait_s):
                await granted
        except BaseException as exc:  # timed out, or the client went away
            if granted.done() and not granted.cancelled():
                self._release()  # the slot came just as we gave up: pass it on
            elif granted in self._waiters:  # (a release may have dropped it already)
                self._waiters.remove(granted)
            if isinstance(exc, TimeoutError):
                raise self.shed(
                    503,
                    "queue_timeout",
                    f"The request waited {self.limits.max_queue_wait_s:g} s for a free slot "
                    "without getting one; the server is overloaded, retry later",
                ) from None
            raise
        return time.monotonic() - began

    def _release(self) -> None:
        """Hand the slot to the longest-waiting request, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.inflight -= 1
