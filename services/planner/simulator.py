"""Discrete-event simulation of a deployment under Poisson arrivals.

What it models: the scheduler reserves a decode instance's KV memory for the whole request
(prompt + output) before prefill starts, or holds the request until memory frees; prefill
instances batch queued prompts up to a token budget (with PP a new batch enters when the first
stage frees); KV crosses each (prefill type, decode type) path as a FIFO link, layer by layer
from the end of the first layer; decode instances run continuous batching (one token per
sequence per round); colocated instances run queued prefills before decode rounds. A mixed
deployment sends each request, drawn by the routes' shares, either through a prefill pool to
a decode type or to the colocated instances (the shortest queue among them).
TTFT ends when the KV reaches decode (or the prefill ends, colocated); TPOT is the mean time
per later token. With a StopRule the run ends as soon as enough measured requests have missed
a target that the verdict is known. What it does not: preemption, chunked prefill, prefix
caching, failures.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from services.planner.deployment import Deployment, Pool, Route, Settings, SimResult, StopRule
from services.planner.perf_model import PerfModel
from services.planner.workload import RequestMix

HORIZON_FACTOR = 20.0  # simulate at most this many times the arrival span past the last arrival
BATCH_GAIN = 0.9  # a prompt joins a prefill batch only if that saves 10% over running it after


@dataclass(eq=False)
class _Request:
    index: int
    arrival: float
    prompt: int
    output: int
    admitted: float = float("inf")
    first_token: float = float("inf")
    finish: float = float("inf")
    route: Route | None = None
    decoder: _Decoder | None = None


@dataclass(eq=False)
class _Prefiller:
    perf: PerfModel
    queue: deque[_Request] = field(default_factory=deque)
    queued_tokens: int = 0
    free: bool = True
    busy: float = 0.0


@dataclass(eq=False)
class _Decoder:
    """A decode or colocated instance: memory, the running batch, requests waiting to join."""

    perf: PerfModel
    gpu: str
    colocated: bool
    kv_free: int
    kv_total: int
    base: np.ndarray  # round time by batch size, context aside
    per_context: float  # round time per context token held by the batch
    ready: deque[_Request] = field(default_factory=deque)  # KV arrived (or, colocated, queued)
    finishing: dict[int, list[_Request]] = field(default_factory=dict)
    running: int = 0
    context: int = 0
    rounds: int = 0
    stepping: bool = False
    span_start: float = 0.0  # decode rounds run in spans: see _Simulation._span
    span_rounds: int = 0
    version: int = 0  # a span's completion event is stale once this changes
    busy: float = 0.0


class _Simulation:
    def __init__(
        self,
        deployment: Deployment,
        mix: RequestMix,
        settings: Settings,
        stop: StopRule | None = None,
    ) -> None:
        self.deployment = deployment
        self.settings = settings
        self.stop = stop
        self.stopped = False
        self.ttft_misses = self.tpot_misses = 0
        self.rng = np.random.default_rng(settings.seed)
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.order = itertools.count()
        self.now = 0.0
        self.prefillers: list[list[_Prefiller]] = []
        self.decoders: dict[str, list[_Decoder]] = {}
        self.colocated: list[_Decoder] = []
        for pool in deployment.pools:
            self._build(pool)
        self.largest_kv = {g: max(d.kv_total for d in ds) for g, ds in self.decoders.items()}
        self.pending: dict[str, deque[_Request]] = {
            r.decode_gpu: deque() for r in deployment.routes if not r.colocated
        }
        self.link_free: dict[tuple[str, str], float] = {}
        rate = mix.rate or 1.0
        gaps = self.rng.exponential(1 / rate, settings.requests)
        prompts = mix.prompt.sample(self.rng, settings.requests)
        outputs = mix.output.sample(self.rng, settings.requests)
        self.requests = [
            _Request(i, float(t), int(p), int(o))
            for i, (t, p, o) in enumerate(zip(np.cumsum(gaps), prompts, outputs, strict=True))
        ]
        if deployment.routes:
            shares = np.array([route.share for route in deployment.routes])
            picks = self.rng.choice(len(shares), size=settings.requests, p=shares / shares.sum())
            for request, pick in zip(self.requests, picks, strict=True):
                request.route = deployment.routes[pick]
        span = self.requests[-1].arrival
        self.horizon = span * (1 + HORIZON_FACTOR)

    def _build(self, pool: Pool) -> None:
        s = self.settings
        perf = pool.perf
        if pool.role == "prefill":
            self.prefillers.append([_Prefiller(perf) for _ in range(pool.instances)])
            return
        self.prefillers.append([])
        sizes = np.arange(s.max_batch + 1, dtype=float)
        base = np.asarray(perf.decode_round(sizes, 0.0))
        per_context = float(perf.decode_round(1.0, 1.0)) - float(perf.decode_round(1.0, 0.0))
        kv = perf.kv_capacity_tokens(s.memory_utilisation, s.max_prefill_tokens)
        colocated = pool.role == "colocated"
        made = [
            _Decoder(perf, perf.shape.gpu.name, colocated, kv, kv, base, per_context)
            for _ in range(pool.instances)
        ]
        if not colocated:
            self.decoders.setdefault(perf.shape.gpu.name, []).extend(made)
        else:
            self.colocated.extend(made)

    def at(self, time: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.events, (time, next(self.order), action))

    def run(self) -> list[_Request]:
        for request in self.requests:
            self.at(request.arrival, lambda r=request: self.arrive(r))
        while self.events and not self.stopped:
            time, _, action = heapq.heappop(self.events)
            if time > self.horizon:
                break
            self.now = time
            action()
        return self.requests

    # outcomes --------------------------------------------------------------------------
    def _first_token(self, request: _Request) -> None:
        request.first_token = self.now
        stop = self.stop
        if stop is not None and request.index >= stop.first_measured:
            if self.now - request.arrival > stop.ttft_s:
                self.ttft_misses += 1
                self.stopped = self.stopped or self.ttft_misses > stop.ttft_misses

    def _finish(self, request: _Request) -> None:
        request.finish = self.now
        stop = self.stop
        if stop is not None and request.index >= stop.first_measured and request.output > 1:
            if (self.now - request.first_token) / (request.output - 1) > stop.tpot_s:
                self.tpot_misses += 1
                self.stopped = self.stopped or self.tpot_misses > stop.tpot_misses

    def _refuse(self, request: _Request) -> None:
        """It can never fit: it stays unfinished, a miss of both targets."""
        stop = self.stop
        if stop is not None and request.index >= stop.first_measured:
            self.ttft_misses += 1
            self.tpot_misses += 1
            self.stopped = (
                self.stopped
                or self.ttft_misses > stop.ttft_misses
                or self.tpot_misses > stop.tpot_misses
            )

    # routing ---------------------------------------------------------------------------
    def arrive(self, request: _Request) -> None:
        if request.route is None or request.route.colocated:
            target = min(self.colocated, key=lambda d: (len(d.ready), d.running))
            self.colocated_arrive(target, request)
            return
        self.pending[request.route.decode_gpu].append(request)
        self.admit(request.route.decode_gpu)

    def admit(self, gpu: str) -> None:
        """Reserve decode memory for waiting requests in order, then start their prefill."""
        waiting = self.pending[gpu]
        decoders = self.decoders.get(gpu, [])
        largest = self.largest_kv.get(gpu, 0)
        while waiting:
            request = waiting[0]
            need = request.prompt + request.output
            if decoders:
                if need > largest:
                    self._refuse(waiting.popleft())
                    continue
                decoder = max(decoders, key=lambda d: d.kv_free)
                if decoder.kv_free < need:
                    return
                decoder.kv_free -= need
                request.decoder = decoder
            waiting.popleft()
            request.admitted = self.now
            assert request.route is not None  # set on arrival
            if request.route.prefill_pool is None:
                self.kv_arrived(request)
                continue
            pool = self.prefillers[request.route.prefill_pool]
            prefiller = min(pool, key=lambda p: (p.queued_tokens, not p.free))
            prefiller.queue.append(request)
            prefiller.queued_tokens += request.prompt
            self.prefill(prefiller)

    # prefill ---------------------------------------------------------------------------
    def prefill(self, p: _Prefiller) -> None:
        if not p.free or not p.queue:
            return
        batch = [p.queue.popleft()]
        tokens, squares = batch[0].prompt, batch[0].prompt ** 2
        while p.queue and self._joins(p.perf, tokens, squares, len(batch), p.queue[0].prompt):
            tokens += p.queue[0].prompt
            squares += p.queue[0].prompt ** 2
            batch.append(p.queue.popleft())
        p.queued_tokens -= tokens
        stage, latency = p.perf.prefill_times(tokens, squares, len(batch))
        p.free = False
        p.busy += stage
        self.at(self.now + stage, lambda: self._prefill_free(p))
        layers = p.perf.model.num_layers
        kv_per_token = p.perf.model.kv_bytes_per_token
        for request in batch:
            assert request.route is not None  # set on arrival
            path = (p.perf.shape.gpu.name, request.route.decode_gpu)
            transfer = request.prompt * kv_per_token * 8 / (self.deployment.link_gbps[path] * 1e9)
            start = max(self.now + latency / layers, self.link_free.get(path, 0.0))
            self.link_free[path] = start + transfer
            arrived = max(start + transfer, self.now + latency + transfer / layers)
            self.at(arrived, lambda r=request: self.kv_arrived(r))

    def _joins(self, perf: PerfModel, tokens: int, squares: int, count: int, prompt: int) -> bool:
        """Whether `prompt` should join a prefill batch: within the token budget, and cheaper
        together than one after the other (batching pays only while GEMMs are memory-bound)."""
        if tokens + prompt > self.settings.max_prefill_tokens:
            return False
        apart = perf.prefill_times(tokens, squares, count)[0]
        apart += perf.prefill_times(prompt, prompt**2, 1)[0]
        together = perf.prefill_times(tokens + prompt, squares + prompt**2, count + 1)[0]
        return together < BATCH_GAIN * apart

    def _prefill_free(self, p: _Prefiller) -> None:
        p.free = True
        self.prefill(p)

    # decode ----------------------------------------------------------------------------
    def kv_arrived(self, request: _Request) -> None:
        self._first_token(request)
        decoder = request.decoder
        if decoder is None:  # prefill timed alone
            request.finish = self.now
            return
        if request.output <= 1:
            request.finish = self.now
            decoder.kv_free += request.prompt + request.output
            self.admit(decoder.gpu)
            return
        decoder.ready.append(request)
        if not decoder.stepping:
            self.decode_rounds(decoder)
        elif decoder.running < self.settings.max_batch:
            self._cut_short(decoder)

    def _join(self, d: _Decoder, request: _Request) -> None:
        d.running += 1
        d.context += request.prompt + 1
        d.finishing.setdefault(d.rounds + request.output - 1, []).append(request)

    def decode_rounds(self, d: _Decoder) -> None:
        while d.ready and d.running < self.settings.max_batch:
            self._join(d, d.ready.popleft())
        if d.running == 0:
            d.stepping = False
            return
        self._run_rounds(d, min(d.finishing) - d.rounds)

    # The batch only changes when a sequence finishes or one joins at a round boundary, so
    # rounds run in spans: until the next finish, cut short when a request becomes ready.
    def _span(self, d: _Decoder, rounds: int) -> float:
        """Time of `rounds` rounds of the current batch (its context grows each round)."""
        growth = d.running * rounds * (rounds - 1) / 2
        return rounds * float(d.base[d.running]) + d.per_context * (rounds * d.context + growth)

    def _run_rounds(self, d: _Decoder, rounds: int) -> None:
        d.stepping = True
        d.span_start, d.span_rounds = self.now, rounds
        d.version += 1
        version = d.version
        self.at(self.now + self._span(d, rounds), lambda: self._rounds_done(d, version))

    def _cut_short(self, d: _Decoder) -> None:
        """End the span at the round in progress, so that ready requests join after it."""
        if d.span_rounds <= 1:
            return  # one round (or a prefill) in progress: it ends soon enough
        elapsed = self.now - d.span_start
        low, high = 1, d.span_rounds  # the first round count whose span reaches `elapsed`
        while low < high:
            middle = (low + high) // 2
            if self._span(d, middle) >= elapsed:
                high = middle
            else:
                low = middle + 1
        if low < d.span_rounds:
            self._run_from(d, low)

    def _run_from(self, d: _Decoder, rounds: int) -> None:
        d.span_rounds = rounds
        d.version += 1
        version = d.version
        self.at(d.span_start + self._span(d, rounds), lambda: self._rounds_done(d, version))

    def _rounds_done(self, d: _Decoder, version: int) -> None:
        if version != d.version:
            return  # this span was cut short
        rounds = d.span_rounds
        d.busy += self.now - d.span_start
        d.context += d.running * rounds
        d.rounds += rounds
        for request in d.finishing.pop(d.rounds, []):
            self._finish(request)
            d.running -= 1
            d.context -= request.prompt + request.output
            d.kv_free += request.prompt + request.output
        d.stepping = False
        if d.colocated:
            self.colocated_step(d)
            return
        self.admit(d.gpu)  # may restart this instance through kv_arrived
        if not d.stepping:
            self.decode_rounds(d)

    # colocated -------------------------------------------------------------------------
    def colocated_arrive(self, d: _Decoder, request: _Request) -> None:
        d.ready.append(request)
        if not d.stepping:
            self.colocated_step(d)
        else:
            self._cut_short(d)

    def colocated_step(self, d: _Decoder) -> None:
        """Prefill whatever fits first; otherwise decode rounds until a change."""
        batch: list[_Request] = []
        tokens = squares = 0
        while d.ready and d.running + len(batch) < self.settings.max_batch:
            request = d.ready[0]
            need = request.prompt + request.output
            if need > d.kv_total:
                self._refuse(d.ready.popleft())
                continue
            joins = not batch or self._joins(d.perf, tokens, squares, len(batch), request.prompt)
            if need > d.kv_free or not joins:
                break
            d.ready.popleft()
            d.kv_free -= need
            request.admitted = self.now
            batch.append(request)
            tokens += request.prompt
            squares += request.prompt**2
        if batch:
            duration = d.perf.prefill_times(tokens, squares, len(batch))[1]
            d.stepping = True
            d.span_rounds = 0  # a prefill is not cut short
            d.busy += duration
            self.at(self.now + duration, lambda: self._colocated_prefilled(d, batch))
        elif d.running:
            self._run_rounds(d, min(d.finishing) - d.rounds)
        else:
            d.stepping = False

    def _colocated_prefilled(self, d: _Decoder, batch: list[_Request]) -> None:
        for request in batch:
            self._first_token(request)
            if request.output <= 1:
                request.finish = self.now
                d.kv_free += request.prompt + request.output
            else:
                self._join(d, request)
        self.colocated_step(d)


def first_measured(settings: Settings) -> int:
    """Index of the first request the statistics count (the earlier ones warm up)."""
    return int(settings.requests * settings.warmup_fraction)


def simulate(
    deployment: Deployment, mix: RequestMix, settings: Settings, stop: StopRule | None = None
) -> SimResult:
    sim = _Simulation(deployment, mix, settings, stop)
    requests = sim.run()
    measured = requests[first_measured(settings) :]
    ttft = np.array([r.first_token - r.arrival for r in measured])
    tpot = np.array(
        [(r.finish - r.first_token) / (r.output - 1) if r.output > 1 else 0.0 for r in measured]
    )
    tpot[~np.isfinite(ttft)] = np.inf
    wait = np.array([r.admitted - r.arrival for r in measured])
    elapsed = max(sim.now, 1e-12)
    busy: dict[str, list[float]] = {}
    for pool, prefillers in zip(deployment.pools, sim.prefillers, strict=True):
        busy.setdefault(pool.role, []).extend(p.busy / elapsed for p in prefillers)
    for role, decoders in (
        ("decode", [d for ds in sim.decoders.values() for d in ds]),
        ("colocated", sim.colocated),
    ):
        if decoders:
            busy.setdefault(role, []).extend(d.busy / elapsed for d in decoders)
    return SimResult(
        ttft=ttft,
        tpot=tpot,
        wait=wait,
        busy={role: float(np.mean(v)) for role, v in busy.items() if v},
        colocated=np.array([r.route is None or r.route.colocated for r in measured]),
        stopped_early=sim.stopped,
    )
