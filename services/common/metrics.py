"""Every Prometheus metric hetserve exports, defined in this one place.

Each service process serves them on `HETSERVE_METRICS_PORT` (0: off). Counters and histograms
count what this process did; gauges that mirror an instance's state (running, waiting, free
and used KV blocks) are labelled with `role` and `instance_id` and set from the heartbeat.
Names follow Prometheus conventions: base units (`_seconds`, `_bytes`), `_total` for counters.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from proto.messages import InstanceInfo, TokenEvent

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# -- gateway: requests as clients see them ----------------------------------------------
REQUESTS = Counter(
    "hetserve_requests_total",
    "Requests the gateway handled, by outcome: finished (the model finished), cancelled "
    "(the gateway stopped early: stop string or client gone), error.",
    ["outcome"],
)
TTFT = Histogram(
    "hetserve_time_to_first_token_seconds",
    "From the gateway submitting a request to its first token.",
    buckets=_LATENCY_BUCKETS,
)
TPOT = Histogram(
    "hetserve_time_per_output_token_seconds",
    "Per request: time after the first token divided by the tokens after it.",
    buckets=_STEP_BUCKETS,
)
E2E_LATENCY = Histogram(
    "hetserve_e2e_request_latency_seconds",
    "From the gateway submitting a request to its last token.",
    buckets=_LATENCY_BUCKETS,
)
PROMPT_TOKENS = Counter("hetserve_prompt_tokens_total", "Prompt tokens of requests received.")
GENERATION_TOKENS = Counter(
    "hetserve_generation_tokens_total", "Tokens generated and delivered to clients."
)
RETRIES = Counter(
    "hetserve_request_retries_total", "Attempts resubmitted after an instance failed."
)
SHED_REQUESTS = Counter(
    "hetserve_shed_requests_total",
    "Requests the gateway refused to admit, by reason: queue_full and key_limit (429), "
    "queue_timeout and no_capacity (503).",
    ["reason"],
)
ADMISSION_WAIT = Histogram(
    "hetserve_admission_wait_seconds",
    "Time an admitted request waited in the gateway for an in-flight slot.",
    buckets=_LATENCY_BUCKETS,
)
UNAUTHORIZED = Counter(
    "hetserve_unauthorized_requests_total",
    "Requests refused with 401: no API key, or not a configured one.",
)

# -- scheduler ---------------------------------------------------------------------------
ROUTED = Counter(
    "hetserve_routed_requests_total",
    "Requests placed, by route (direct or converter).",
    ["route"],
)
LOCAL_ROUTES = Counter(
    "hetserve_scheduler_local_prefill_routes_total",
    "Requests routed to a decode instance that prefills them itself.",
)
ROUTE_SECONDS = Histogram(
    "hetserve_route_seconds",
    "Time to place a request: reserve on decode, hand to prefill.",
    buckets=_STEP_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "hetserve_queue_depth",
    "Messages waiting in a JetStream queue (requests: not yet routed).",
    ["queue"],
)

# -- prefill and decode ------------------------------------------------------------------
PREFILL_REQUESTS = Counter("hetserve_prefill_requests_total", "Prompts prefilled.")
PREFILL_TOKENS = Counter("hetserve_prefill_tokens_total", "Context tokens prefilled.")
PREFILL_SECONDS = Histogram(
    "hetserve_prefill_seconds",
    "Time of one prefill, from the engine taking the prompt to its first token (vLLM: "
    "including its batching with other prompts).",
    buckets=_LATENCY_BUCKETS,
)
RESERVATIONS = Counter(
    "hetserve_kv_reservations_total",
    "Decode KV reservations, by outcome (ok or refused).",
    ["outcome"],
)
DECODE_REQUESTS = Counter(
    "hetserve_decode_requests_total", "Requests a decode instance finished generating."
)
LOCAL_PREFILLS = Counter(
    "hetserve_decode_local_prefills_total",
    "Prompts a decode instance prefilled itself (conditional disaggregation).",
)
DECODE_TOKENS = Counter("hetserve_decode_tokens_total", "Tokens a decode instance generated.")
DECODE_KV_LOADED_TOKENS = Counter(
    "hetserve_decode_kv_loaded_tokens_total",
    "Prompt tokens decode took from transferred KV instead of computing them.",
)
DECODE_STEP_SECONDS = Histogram(
    "hetserve_decode_step_seconds", "Model time of one batched decode step.", buckets=_STEP_BUCKETS
)

# -- KV frames (services/kv: prefill and converter send; converter and decode receive) -------
KV_SENT_BYTES = Counter("hetserve_kv_sent_bytes_total", "Bytes of KV frames published.")
KV_SENT_FRAMES = Counter("hetserve_kv_sent_frames_total", "KV frames published.")
KV_RECEIVED_BYTES = Counter(
    "hetserve_kv_received_bytes_total", "Bytes of KV frames received and accepted."
)
KV_RECEIVED_FRAMES = Counter(
    "hetserve_kv_received_frames_total", "KV frames received and accepted."
)

# -- converter ---------------------------------------------------------------------------
KV_CONVERTED_BYTES = Counter(
    "hetserve_kv_converted_bytes_total", "KV payload bytes produced in the destination layout."
)
KV_CONVERTED_FRAMES = Counter(
    "hetserve_kv_converted_frames_total", "KV data frames produced in the destination layout."
)
CONVERSION_SECONDS = Histogram(
    "hetserve_kv_conversion_seconds",
    "Time to re-lay one layer of one request.",
    buckets=_STEP_BUCKETS,
)
CONVERSIONS = Counter("hetserve_conversions_total", "Requests whose KV was fully converted.")

# -- every service -----------------------------------------------------------------------
ERRORS = Counter(
    "hetserve_errors_total",
    "Failures, by the component that saw them (a role, or kv_stream) and a short reason.",
    ["component", "reason"],
)
RUNNING = Gauge(
    "hetserve_running_requests",
    "Requests an instance is working on (decode: the running batch).",
    ["role", "instance_id"],
)
WAITING = Gauge(
    "hetserve_waiting_requests", "Requests queued at an instance.", ["role", "instance_id"]
)
KV_FREE_BLOCKS = Gauge("hetserve_kv_free_blocks", "Free KV cache blocks.", ["role", "instance_id"])
KV_USED_BLOCKS = Gauge("hetserve_kv_used_blocks", "Used KV cache blocks.", ["role", "instance_id"])

# Known label values exist from the start, so rate() sees their first increment.
for _outcome in ("finished", "cancelled", "error"):
    REQUESTS.labels(_outcome)
for _route in ("direct", "converter"):
    ROUTED.labels(_route)
for _outcome in ("ok", "refused"):
    RESERVATIONS.labels(_outcome)
for _reason in ("queue_full", "key_limit", "queue_timeout", "no_capacity"):
    SHED_REQUESTS.labels(_reason)


def error(component: str, reason: str) -> None:
    """Count a failure; `reason` is a short fixed word, never a message."""
    ERRORS.labels(component, reason).inc()


RECENT_ERRORS_S = 300.0  # what InstanceInfo.recent_errors covers


def error_counts() -> dict[str, int]:
    """This process's hetserve_errors_total so far, by "component/reason"."""
    return {
        f"{sample.labels['component']}/{sample.labels['reason']}": int(sample.value)
        for metric in ERRORS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


class RecentErrors:
    """The error counts of the last `window_s` seconds, from samples of the counter taken at
    every heartbeat: the newest sample older than the window is the baseline."""

    def __init__(self, window_s: float = RECENT_ERRORS_S):
        self.window_s = window_s
        self.samples: deque[tuple[float, dict[str, int]]] = deque()

    def update(self, now: float) -> tuple[dict[str, int], dict[str, int]]:
        """(counts since the process started, counts within the window)."""
        counts = error_counts()
        self.samples.append((now, counts))
        cutoff = now - self.window_s
        while len(self.samples) > 1 and self.samples[1][0] <= cutoff:
            self.samples.popleft()
        first_at, first = self.samples[0]
        base = first if first_at <= cutoff else {}  # younger than the window: all are recent
        recent = {key: n - base.get(key, 0) for key, n in counts.items() if n > base.get(key, 0)}
        return counts, recent


def frame_sent(nbytes: int) -> None:
    """A KV sender (prefill, converter) published a frame."""
    KV_SENT_BYTES.inc(nbytes)
    KV_SENT_FRAMES.inc()


def frame_received(nbytes: int, accepted: bool) -> None:
    """A KV receiver (decode, converter) acknowledged a frame, or rejected it."""
    if accepted:
        KV_RECEIVED_BYTES.inc(nbytes)
        KV_RECEIVED_FRAMES.inc()
    else:
        error("kv_stream", "frame_rejected")


def routed(seconds: float, via_converter: bool) -> None:
    """The scheduler placed a request in `seconds`."""
    ROUTE_SECONDS.observe(seconds)
    ROUTED.labels("converter" if via_converter else "direct").inc()


def record_status(info: InstanceInfo) -> None:
    """Mirror an instance's heartbeat in the state gauges."""
    labels = (info.role, info.instance_id)
    RUNNING.labels(*labels).set(info.running)
    WAITING.labels(*labels).set(info.waiting)
    if info.total_blocks:
        KV_FREE_BLOCKS.labels(*labels).set(info.free_blocks)
        KV_USED_BLOCKS.labels(*labels).set(info.total_blocks - info.free_blocks)


class RequestTracker:
    """One gateway request: TTFT, TPOT, end-to-end latency and token counts."""

    def __init__(self, prompt_tokens: int):
        self.started = time.monotonic()
        self.first: float | None = None
        self.last = self.started
        self.tokens = 0
        self.finished = False
        PROMPT_TOKENS.inc(prompt_tokens)

    def delivered(self, event: TokenEvent) -> None:
        """A token event is on its way to the client."""
        now = time.monotonic()
        if self.first is None and event.token_ids:
            self.first = now
            TTFT.observe(now - self.started)
        self.last = now
        self.tokens += len(event.token_ids)
        self.finished = self.finished or event.finish_reason is not None
        GENERATION_TOKENS.inc(len(event.token_ids))

    def done(self, outcome: str) -> None:
        REQUESTS.labels(outcome).inc()
        if outcome == "error" or self.first is None:
            return
        E2E_LATENCY.observe(self.last - self.started)
        if self.tokens > 1:
            TPOT.observe((self.last - self.first) / (self.tokens - 1))


@contextmanager
def track_request(prompt_tokens: int) -> Iterator[RequestTracker]:
    """Around a gateway request: records its outcome however it ends. The HTTP layer closes
    the event stream once it has the last event, so a close after that is a finish."""
    tracker = RequestTracker(prompt_tokens)
    try:
        yield tracker
    except Exception as exc:
        tracker.done("error")
        error("gateway", str(getattr(exc, "code", "") or "internal"))
        raise
    except BaseException:  # GeneratorExit or CancelledError: the gateway stopped early
        tracker.done("finished" if tracker.finished else "cancelled")
        raise
    tracker.done("finished")


def exposition() -> tuple[bytes, str]:
    """This process's metrics in Prometheus' text format, and its content type (for a server
    that serves /metrics itself, as the gateway does on its API port)."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def serve_metrics(port: int) -> Callable[[], None] | None:
    """Serve /metrics on `port` (all interfaces) in a thread; returns how to stop. 0: off."""
    if not port:
        return None
    try:
        server, thread = start_http_server(port)
    except OSError as exc:
        raise ConnectionError(f"cannot serve metrics on port {port}: {exc}") from exc
    log.info("Prometheus metrics on :%d/metrics", port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
