"""Chaos under load: a redundant system serves a steady stream of streamed greedy requests
while one instance of each role is killed with SIGKILL, one after another. Every answer is
checked against transformers' tokens, every decode's blocks are counted afterwards.

The load is `concurrency` clients, each sending its next request as soon as the last one
ended, from the start until `tail_s` after the last kill. A request is
- completed: it streamed every token and they equal transformers';
- wrong: it completed with other tokens (a retry that resumed wrongly);
- failed: the system answered with an error (its message is kept);
- shed: refused at the door with 429/503 and Retry-After (the client waits a second before
  its next one, as a client honouring Retry-After would; not counted as admitted);
- hung: no answer within `request_timeout_s`, which is longer than the system's own timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats.errors

from proto.messages import InstanceInfo
from services.bench.client import RequestResult, send_request
from services.bench.oracle import hf_greedy
from services.common.bus import Bus
from services.common.nats_server import NatsCluster
from services.common.registry import Registry
from services.common.settings import CommonSettings
from services.hf.config import load_model_config

log = logging.getLogger(__name__)

KILL_ORDER = ("decode", "prefill", "converter", "scheduler")
STALLED_S = 1.0  # a stream that waited longer for its next token was hit by the kill
SHED_PAUSE_S = 1.0  # a client's wait after a refusal with Retry-After


@dataclass
class ChaosConfig:
    prompts: list[list[int]]  # token ids; requests cycle through them
    expected: list[list[int]]  # transformers' greedy tokens for each prompt
    model: str
    concurrency: int = 100
    warmup_s: float = 5.0  # load before the first kill
    kill_interval_s: float = 8.0
    tail_s: float = 20.0  # load after the last kill
    request_timeout_s: float = 180.0
    drain_timeout_s: float = 60.0  # for every decode's blocks to come back after the load
    roles: tuple[str, ...] = KILL_ORDER

    @property
    def max_tokens(self) -> int:
        return len(self.expected[0])

    @classmethod
    def for_model(
        cls, model_dir: Path, prompts: int, max_tokens: int, seed: int = 0, **options: Any
    ) -> ChaosConfig:
        """`prompts` random prompts (make_prompts) and transformers' tokens for each."""
        drawn = make_prompts(model_dir, prompts, seed)
        expected = [hf_greedy(model_dir, p, max_tokens) for p in drawn]
        return cls(prompts=drawn, expected=expected, model=model_dir.name, **options)


@dataclass
class Kill:
    role: str
    instance_id: str
    pid: int
    at_s: float  # since the load began
    in_flight: int = 0  # streams sent before the kill that completed after it
    stalled: int = 0  # of those, how many waited longer than STALLED_S for a token
    longest_stall_s: float | None = None  # the longest such wait (the time to recover)
    back_after_s: float | None = None  # registered again (a restart) this long after; None: not


@dataclass
class ChaosReport:
    requests: int
    shed: int
    completed: int
    wrong: int
    failed: int
    hung: int
    errors: dict[str, int]  # error message (request ids cut) -> count
    kills: list[Kill]
    # per decode: blocks still held once the load ended and drain_timeout_s passed
    stranded_blocks: dict[str, int]
    blocks_back_after_s: float | None  # how long after the load every block was free again
    duration_s: float
    concurrency: int

    @property
    def admitted(self) -> int:
        return self.requests - self.shed

    @property
    def completed_share(self) -> float:
        """Of the requests admitted (not shed at the door)."""
        return self.completed / self.admitted if self.admitted else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "admitted": self.admitted,
            "completed_share": self.completed_share,
        }

    def lines(self) -> list[str]:
        out = [
            f"{self.requests} requests at concurrency {self.concurrency} in "
            f"{self.duration_s:.0f}s, {self.shed} shed with Retry-After; of the {self.admitted} "
            f"admitted {self.completed} completed ({self.completed_share:.1%}), "
            f"{self.wrong} wrong tokens, {self.failed} failed with an error, {self.hung} hung",
        ]
        for k in self.kills:
            stall = "-" if k.longest_stall_s is None else f"{k.longest_stall_s:.1f}s"
            back = "not restarted" if k.back_after_s is None else f"back {k.back_after_s:.1f}s"
            out.append(
                f"  t={k.at_s:5.1f}s kill -9 {k.role} {k.instance_id} (pid {k.pid}): "
                f"{k.stalled} of {k.in_flight} streams in flight stalled, longest {stall}; "
                f"{back}"
            )
        for message, count in sorted(self.errors.items(), key=lambda e: -e[1]):
            out.append(f"  error x{count}: {message}")
        held = {d: n for d, n in self.stranded_blocks.items() if n}
        blocks = (
            f"every decode's blocks free {self.blocks_back_after_s:.1f}s after the load"
            if self.blocks_back_after_s is not None
            else f"blocks still held: {held}"
        )
        out.append(f"  {blocks}")
        return out


class Watch:
    """The admin's view of the system: the registry's live instances, a decode's stats."""

    def __init__(self, bus: Bus, registry: Registry):
        self.bus = bus
        self.registry = registry

    @classmethod
    async def connect(cls, admin_url: str, prefix: str) -> Watch:
        settings = CommonSettings(nats_url=admin_url, prefix=prefix)
        bus = await Bus.connect(settings, "chaos")
        registry = Registry(bus, settings.instance_ttl_s)
        await registry.start()
        return cls(bus, registry)

    def instances(self) -> list[InstanceInfo]:
        return self.registry.live()

    async def fresh(self, role: str) -> list[InstanceInfo]:
        """The live instances of `role` as they report themselves now (the registry's copy
        is up to a heartbeat old)."""
        out = []
        for info in self.instances():
            if info.role == role:
                try:
                    out.append(await self.stats(info.instance_id))
                except (TimeoutError, nats.errors.Error):
                    out.append(info)
        return out

    async def stats(self, instance_id: str) -> InstanceInfo:
        msg = await self.bus.nc.request(self.bus.subjects.stats(instance_id), b"", timeout=5)
        return InstanceInfo.unpack(msg.data)

    async def close(self) -> None:
        await self.registry.stop()
        await self.bus.close()


def make_prompts(model_dir: Path, count: int, seed: int) -> list[list[int]]:
    """Token-id prompts of 8 to 160 tokens (none a prefix of another, but for chance)."""
    vocab = load_model_config(model_dir).vocab_size
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(8, 160))] for _ in range(count)]


def _victim(role: str, live: list[InstanceInfo]) -> InstanceInfo | None:
    """The instance of `role` doing the most (a decode's running sequences, a prefill's queued
    tokens): killing a busy one hurts the most requests."""
    ofrole = [i for i in live if i.role == role and i.pid]
    if not ofrole:
        return None
    return max(ofrole, key=lambda i: (i.running + i.waiting, i.queued_tokens, i.instance_id))


def _short(error: str) -> str:
    """An error message without the request ids and numbers that make each one unique."""
    words = []
    for word in error.split():
        if any(ch.isdigit() for ch in word) and len(word) > 6:
            word = "<id>"
        words.append(word)
    return " ".join(words)[:200]


async def run_chaos(
    base_url: str,
    watch: Watch,
    config: ChaosConfig,
    victims: dict[str, Callable[[], tuple[str, int]]] | None = None,
) -> ChaosReport:
    """`victims`: roles that are not instances (e.g. "nats": a NATS server), each with what
    names the process to kill now and its pid."""
    began = time.perf_counter()
    stop = asyncio.Event()
    results: list[tuple[int, RequestResult]] = []
    kills: list[Kill] = []
    returns: list[asyncio.Task] = []  # each waits for a killed instance to come back
    url = f"{base_url}/completions"
    counter = iter(range(1 << 62))

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            index = next(counter) % len(config.prompts)
            body = {
                "model": config.model,
                "prompt": config.prompts[index],
                "max_tokens": config.max_tokens,
                "temperature": 0.0,
                "stream": True,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            result = await send_request(session, url, body, timeout_s=config.request_timeout_s)
            results.append((index, result))
            if result.shed:
                await asyncio.sleep(SHED_PAUSE_S)

    async def killer() -> None:
        await asyncio.sleep(config.warmup_s)
        for n, role in enumerate(config.roles):
            if n:
                await asyncio.sleep(config.kill_interval_s)
            if victims and role in victims:
                name, pid = victims[role]()
            else:
                victim = _victim(role, await watch.fresh(role))
                if victim is None:
                    log.warning("no live %s to kill", role)
                    continue
                name, pid = victim.instance_id, victim.pid
            os.kill(pid, signal.SIGKILL)
            at = time.perf_counter()
            kills.append(Kill(role, name, pid, at - began))
            log.info("killed %s %s (pid %d)", role, name, pid)
            if not (victims and role in victims):
                returns.append(asyncio.create_task(_watch_return(watch, kills[-1], pid, at)))
        await asyncio.sleep(config.tail_s)
        stop.set()

    connector = aiohttp.TCPConnector(limit=config.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        clients = [asyncio.create_task(client(session)) for _ in range(config.concurrency)]
        await killer()
        await asyncio.gather(*clients)
    load_ended = time.perf_counter()
    stranded, blocks_back = await _drain(watch, config.drain_timeout_s, load_ended)
    for task in returns:
        task.cancel()

    for k in kills:
        at = began + k.at_s
        spanning = [r for _, r in results if r.ok and r.sent_at < at < r.arrivals[-1]]
        stalls = [_stall_after(r, at) for r in spanning]
        k.in_flight = len(spanning)
        k.stalled = sum(1 for s in stalls if s > STALLED_S)
        k.longest_stall_s = max(stalls, default=None)

    completed = wrong = failed = hung = shed = 0
    errors: Counter[str] = Counter()
    for index, r in results:
        if r.shed:
            shed += 1
        elif r.ok and r.output_ids == config.expected[index]:
            completed += 1
        elif r.ok:
            wrong += 1
            errors["tokens differ from transformers'"] += 1
        elif r.error and r.error.startswith("timed out"):
            hung += 1
        else:
            failed += 1
            errors[_short(r.error or "no answer")] += 1
    return ChaosReport(
        requests=len(results),
        shed=shed,
        completed=completed,
        wrong=wrong,
        failed=failed,
        hung=hung,
        errors=dict(errors),
        kills=kills,
        stranded_blocks=stranded,
        blocks_back_after_s=blocks_back,
        duration_s=load_ended - began,
        concurrency=config.concurrency,
    )


def _stall_after(result: RequestResult, at: float) -> float:
    """The longest wait for a token of a stream from `at` on: from its send or last token
    before `at` to the next one, and every gap after."""
    times = [result.sent_at, *result.arrivals]
    return max(b - max(a, at) for a, b in zip(times, times[1:], strict=False) if b > at)


def first_server(cluster: NatsCluster) -> dict[str, Callable[[], tuple[str, int]]]:
    """The victim for role "nats": the cluster's first server."""
    server = cluster.servers[0]

    def victim() -> tuple[str, int]:
        assert server.process is not None, "the cluster is not running"
        return f"nats-server {server.url}", server.process.pid

    return {"nats": victim}


async def chaos_on(
    base_url: str,
    admin_url: str,
    prefix: str,
    config: ChaosConfig,
    victims: dict[str, Callable[[], tuple[str, int]]] | None = None,
) -> ChaosReport:
    """run_chaos on a running system, watched over NATS as its admin."""
    watch = await Watch.connect(admin_url, prefix)
    try:
        return await run_chaos(base_url, watch, config, victims)
    finally:
        await watch.close()


async def _watch_return(watch: Watch, kill: Kill, old_pid: int, at: float) -> None:
    """Sets kill.back_after_s once the instance heartbeats again from a new process."""
    deadline = at + 120.0
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.25)
        back = [i for i in watch.instances() if i.instance_id == kill.instance_id]
        if back and back[0].pid != old_pid:
            kill.back_after_s = time.perf_counter() - at
            return


async def _drain(
    watch: Watch, timeout_s: float, since: float
) -> tuple[dict[str, int], float | None]:
    """Waits for every live decode to hold no blocks; (blocks each still holds, when all were
    free, seconds after `since`, or None)."""
    deadline = time.perf_counter() + timeout_s
    held: dict[str, int] = {}
    while True:
        decodes = [i for i in watch.instances() if i.role == "decode"]
        held = {}
        for d in decodes:
            try:
                s = await watch.stats(d.instance_id)
            except (TimeoutError, nats.errors.Error):
                continue  # a decode that died: its blocks died with it
            held[d.instance_id] = s.total_blocks - s.free_blocks
        if decodes and not any(held.values()):
            return held, time.perf_counter() - since
        if time.perf_counter() > deadline:
            return held, None
        await asyncio.sleep(0.5)
