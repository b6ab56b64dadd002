"""The highest arrival rate one instance sustains within the SLO: queueing estimates.

Prefill: an M/G/1 queue (one prompt per service; batching in the simulator only, so this is
conservative for short prompts) whose wait has the Pollaczek-Khinchine mean and an exponential
tail, P(W > t) = rho exp(-t rho / E[W]); TTFT = wait + prefill latency + exposed KV transfer.
Decode: continuous batching; by Little's law the mean batch B = rate x decode steps x step time;
the batch fluctuates like a Poisson count, so a request sees about B + z sqrt(B) sequences.
Colocated: one queue for both phases, prefill first; decode runs in the time prefill leaves,
and each request's TPOT carries the stalls of the prefills that arrive during its decode.
`level` is the share of requests that must meet each phase's target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr, ndtri

from services.planner.perf_model import PerfModel, transfer_tail
from services.planner.workload import RequestMix

MEMORY_LEVEL = 0.99  # share of time the decode batch's KV must fit without waiting
_BISECTION_STEPS = 24  # halvings: 6e-8 of the initial interval
_GRID, _PASSES = 63, 4  # the rate search: 63 rates a pass shrink the interval 64-fold, 4 times


@dataclass(frozen=True)
class Capacity:
    """Requests per second one instance sustains (0 when none), and why it is limited; for a
    configuration that meets no load, its latency at zero load (TTFT, or TPOT for one sequence)."""

    rate: float
    reason: str
    unloaded_s: float | None = None


@dataclass(frozen=True)
class PhaseTargets:
    ttft_s: float
    tpot_s: float
    level: float
    max_batch: int
    max_prefill_tokens: int
    memory_utilisation: float


class PrefillQueue:
    """An M/G/1 prefill queue: per representative prompt, its service time (what holds the
    queue) and its fixed latency up to the first token (service, pipeline, exposed KV)."""

    def __init__(self, service: np.ndarray, fixed: np.ndarray) -> None:
        self.service, self.fixed = service, fixed
        self.mean_service = float(service.mean())
        self.second_moment = float(np.mean(service**2))

    def share_within(self, rate: float, slo: float) -> float:
        """P(wait + fixed <= slo) at this arrival rate (0 when the queue is unstable)."""
        return float(self.shares_within(np.array([rate]), slo)[0])

    def shares_within(self, rates: np.ndarray, slo: float) -> np.ndarray:
        return _shares_within(
            rates, self.fixed[None, :], self.mean_service, self.second_moment, slo
        )

    def meets(self, rate: float, slo: float, level: float) -> bool:
        return self.share_within(rate, slo) >= level

    def quantile(self, rate: float, level: float) -> float:
        """TTFT at `level`: the smallest t with P(TTFT <= t) >= level (inf if unstable)."""
        if rate * self.mean_service >= 1:
            return float("inf")
        low, high = 0.0, float(self.fixed.max()) * 2 + 1.0
        while not self.meets(rate, high, level):
            high *= 2
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            if self.meets(rate, middle, level):
                high = middle
            else:
                low = middle
        return high


def _shares_within(
    rates: np.ndarray, fixed: np.ndarray, mean_service: float, second_moment: float, slo: float
) -> np.ndarray:
    """P(wait + fixed <= slo) per arrival rate (0 where the queue is unstable): the wait has
    the Pollaczek-Khinchine mean E[W] and the tail P(W > t) = rho exp(-t rho / E[W]), where
    rho / E[W] = 2 E[S] (1 - rho) / E[S^2]. `fixed` has one row per rate, or one for all."""
    rho = np.asarray(rates, dtype=float)[:, None] * mean_service
    slack = slo - fixed
    with np.errstate(over="ignore"):
        decay = 2 * mean_service * (1 - rho) / second_moment
        tail = rho * np.exp(-np.maximum(slack, 0) * decay)
    shares = np.mean(np.where(slack >= 0, 1 - tail, 0.0), axis=1)
    return np.where(rho[:, 0] < 1, shares, 0.0)


def _largest_rate(ok: Callable[[np.ndarray], np.ndarray], upper: float) -> float:
    """The largest rate in [0, upper) for which `ok` holds, within 6e-8 of `upper`. `ok` takes
    an array of rates and is monotone (it holds up to some rate): each pass tries _GRID rates
    at once and keeps the interval where it stops holding."""
    low, high = 0.0, upper
    fractions = np.arange(1, _GRID + 1) / (_GRID + 1)
    for _ in range(_PASSES):
        rates = low + (high - low) * fractions
        holds = np.asarray(ok(rates), dtype=bool)
        first_miss = _GRID if holds.all() else int(np.argmin(holds))
        low, high = (
            rates[first_miss - 1] if first_miss > 0 else low,
            rates[first_miss] if first_miss < _GRID else high,
        )
    return float(low)


def prefill_queue(perf: PerfModel, mix: RequestMix, link_gbps: float) -> PrefillQueue:
    """The queue of one prefill instance whose KV crosses a link of `link_gbps`."""
    s = mix.prompt.points
    service = np.asarray(perf.prefill_stage_time(s, s**2, 1))
    latency = np.asarray(perf.prefill_latency(s, s**2, 1))
    kv = s * perf.model.kv_bytes_per_token
    tail = transfer_tail(kv, latency, perf.model.num_layers, link_gbps)
    return PrefillQueue(service, latency + tail)


def prefill_capacity(
    perf: PerfModel, mix: RequestMix, targets: PhaseTargets, link_gbps: float
) -> Capacity:
    queue = prefill_queue(perf, mix, link_gbps)
    if not queue.meets(0.0, targets.ttft_s, targets.level):
        unloaded = float(np.quantile(queue.fixed, targets.level))
        return Capacity(
            0.0,
            f"TTFT at zero load is {unloaded:.3g} s at the {targets.level:.1%} level "
            f"(target {targets.ttft_s:g} s)",
            unloaded,
        )
    rate = _largest_rate(
        lambda rates: queue.shares_within(rates, targets.ttft_s) >= targets.level,
        1 / queue.mean_service,
    )
    return Capacity(rate, "TTFT queueing")


def _decode_limits(
    perf: PerfModel, mix: RequestMix, targets: PhaseTargets
) -> tuple[float, float, str]:
    """(KV tokens per instance, largest request, reason) for the memory checks."""
    kv_tokens = perf.kv_capacity_tokens(targets.memory_utilisation, targets.max_prefill_tokens)
    largest = mix.prompt.largest + mix.output.largest
    reason = f"KV memory holds {kv_tokens} tokens; the largest request needs {largest}"
    return kv_tokens, largest, reason


def _batch_grid(max_batch: int) -> np.ndarray:
    return np.linspace(max_batch / 4096, max_batch, 4096)


class _LittleBatch:
    """The mean decode batch by Little's law, on the batch grid: the smallest B with
    rate x steps x round(B) <= B x share (share: the time left to decode). Found by binary
    search on the running minimum of round(B) / B, which is exact whatever its shape."""

    def __init__(self, perf: PerfModel, mix: RequestMix, max_batch: int) -> None:
        self.batch = _batch_grid(max_batch)
        context = mix.mean_prompt + mix.mean_output / 2
        self.step = np.asarray(perf.decode_round(self.batch, self.batch * context))
        self._bound = -np.minimum.accumulate(self.step / self.batch)  # non-decreasing
        self._steps = mix.mean_output - 1

    def index(self, rates: np.ndarray, share: np.ndarray) -> np.ndarray:
        """Grid index of the mean batch per rate; len(grid) where no batch keeps up."""
        with np.errstate(divide="ignore"):
            threshold = share / (rates * self._steps)
        return np.searchsorted(self._bound, -threshold, side="left")


def decode_capacity(perf: PerfModel, mix: RequestMix, targets: PhaseTargets) -> Capacity:
    kv_tokens, largest, memory_reason = _decode_limits(perf, mix, targets)
    if kv_tokens < largest:
        return Capacity(0.0, memory_reason)
    context = mix.mean_prompt + mix.mean_output / 2
    held = mix.mean_prompt + mix.mean_output
    batch = _batch_grid(targets.max_batch)
    seen = batch + ndtri(targets.level) * np.sqrt(batch)
    peak = batch + ndtri(MEMORY_LEVEL) * np.sqrt(batch)
    tpot = np.asarray(perf.decode_round(seen, seen * context))
    checks = {  # each holds for a prefix of the batch grid
        f"TPOT (target {targets.tpot_s:g} s)": tpot <= targets.tpot_s,
        f"KV memory ({kv_tokens} tokens)": peak * held <= kv_tokens,
        f"max_batch ({targets.max_batch})": seen <= targets.max_batch,
    }
    ok = np.logical_and.reduce(list(checks.values()))
    binding = next(
        (name for name, holds in checks.items() if not holds[min(ok.sum(), len(ok) - 1)]),
        f"max_batch ({targets.max_batch})",
    )
    if not ok.any():
        single = float(perf.decode_round(1.0, context))
        return Capacity(0.0, f"no decode batch meets {binding}", single)
    best = batch[ok].max()
    steps = mix.mean_output - 1
    rate = best / (steps * float(perf.decode_round(best, best * context)))
    return Capacity(float(rate), binding)


def interrupted_tpot_share(
    round_s: np.ndarray,
    share: np.ndarray,
    rate: np.ndarray,
    second_moment: float,
    outputs: np.ndarray,
    tpot_s: float,
) -> np.ndarray:
    """Share of requests whose TPOT meets `tpot_s` on a colocated instance, where prefills
    (Poisson at `rate`, service S with E[S^2] = `second_moment`) preempt decode after the
    round in progress. A request of L output tokens needs T = (L - 1) rounds of compute; each
    prefill arriving meanwhile stalls it for an M/G/1 busy period (that prefill and those
    arriving during it), so the stall is compound Poisson with mean rate T E[S] / share and
    variance rate T E[S^2] / share^3 (share = 1 - rate E[S]), taken as normal. One value per
    element of the arrays `round_s`, `share` and `rate`."""
    round_s, share, rate = (np.asarray(a, dtype=float)[:, None] for a in (round_s, share, rate))
    steps = np.maximum(outputs - 1, 0)
    decoding = steps > 0
    if not decoding.any():
        return np.ones(len(round_s))
    steps = steps[decoding][None, :]
    spread = np.sqrt(rate * steps * round_s * second_moment / share**3) / steps
    mean = round_s / share
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(
            spread > 0, (tpot_s - mean) / spread, np.where(mean <= tpot_s, np.inf, -np.inf)
        )
    return (np.sum(ndtr(z), axis=1) + np.sum(~decoding)) / len(outputs)


def colocated_capacity(perf: PerfModel, mix: RequestMix, targets: PhaseTargets) -> Capacity:
    """Both phases on one instance, prefill first: decode progresses in the time prefill
    leaves, and a request's TPOT carries the stalls of the prefills during its decode."""
    kv_tokens, largest, memory_reason = _decode_limits(perf, mix, targets)
    if kv_tokens < largest:
        return Capacity(0.0, memory_reason)
    s = mix.prompt.points
    service = np.asarray(perf.prefill_latency(s, s**2, 1))
    mean_service = float(service.mean())
    second_moment = float(np.mean(service**2))
    outputs = mix.output.points
    context = mix.mean_prompt + mix.mean_output / 2
    held = mix.mean_prompt + mix.mean_output
    z, z_memory = float(ndtri(targets.level)), float(ndtri(MEMORY_LEVEL))
    little = _LittleBatch(perf, mix, targets.max_batch)

    def ok(rates: np.ndarray) -> np.ndarray:
        share = 1 - rates * mean_service  # time left to decode
        index = little.index(rates, share)
        found = (index < len(little.batch)) & (share > 0)
        mean_batch = little.batch[np.minimum(index, len(little.batch) - 1)]
        seen = mean_batch + z * np.sqrt(mean_batch)
        fits = (seen <= targets.max_batch) & (
            (mean_batch + z_memory * np.sqrt(mean_batch)) * held <= kv_tokens
        )
        share = np.where(found, share, 1.0)
        round_s = np.asarray(perf.decode_round(seen, seen * context))
        met = interrupted_tpot_share(round_s, share, rates, second_moment, outputs, targets.tpot_s)
        residual = np.asarray(perf.decode_round(mean_batch, mean_batch * context))
        fixed = service[None, :] + residual[:, None]
        ttft = _shares_within(rates, fixed, mean_service, second_moment, targets.ttft_s)
        return found & fits & (met >= targets.level) & (ttft >= targets.level)

    if not ok(np.array([1e-9]))[0]:
        return Capacity(0.0, "no load meets both TTFT and TPOT when both phases share the GPUs")
    return Capacity(_largest_rate(ok, 1 / mean_service), "TTFT and TPOT on shared GPUs")


def mean_decode_batch(
    perf: PerfModel, mix: RequestMix, rate: float, max_batch: int, share: float = 1.0
) -> float | None:
    """The mean decode batch at `rate` requests/s (Little's law: B = rate x steps x round(B)
    / share, `share` the time left to decode); None when no batch up to max_batch keeps up."""
    if share <= 0:
        return None
    little = _LittleBatch(perf, mix, max_batch)
    index = int(little.index(np.array([rate]), np.array([share]))[0])
    return float(little.batch[index]) if index < len(little.batch) else None


def tpot_quantile(
    perf: PerfModel, mix: RequestMix, rate: float, level: float, max_batch: int
) -> float:
    """TPOT at `level` for a decode instance at `rate` (inf when the batch cannot keep up)."""
    context = mix.mean_prompt + mix.mean_output / 2
    if rate <= 0:
        return float(perf.decode_round(1.0, context))
    mean_batch = mean_decode_batch(perf, mix, rate, max_batch)
    if mean_batch is None:
        return float("inf")
    seen = mean_batch + ndtri(level) * np.sqrt(mean_batch)
    return float(perf.decode_round(seen, seen * context))


def colocated_tpot_quantile(
    perf: PerfModel, mix: RequestMix, rate: float, level: float, max_batch: int
) -> float:
    """TPOT at `level` for a colocated instance at `rate`, prefill stalls included (inf when
    decode cannot keep up in the time prefill leaves)."""
    s = mix.prompt.points
    service = np.asarray(perf.prefill_latency(s, s**2, 1))
    share = 1 - rate * float(service.mean())
    mean_batch = mean_decode_batch(perf, mix, rate, max_batch, share) if rate > 0 else 1.0
    if mean_batch is None:
        return float("inf")
    seen = mean_batch + ndtri(level) * np.sqrt(mean_batch)
    context = mix.mean_prompt + mix.mean_output / 2
    round_s = float(perf.decode_round(seen, seen * context))
    second = float(np.mean(service**2))
    outputs = mix.output.points

    def met(tpot: float) -> bool:
        shares = interrupted_tpot_share(
            np.array([round_s]), np.array([share]), np.array([rate]), second, outputs, tpot
        )
        return bool(shares[0] >= level)

    low, high = 0.0, round_s / share * 2
    while not met(high):
        high *= 2
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (low, middle) if met(middle) else (middle, high)
    return high


def mean_prefill_s(perf: PerfModel, mix: RequestMix) -> float:
    """Mean time one prompt of the mix holds an instance, prefilled alone."""
    s = mix.prompt.points
    return float(np.mean(perf.prefill_latency(s, s**2, 1)))
