"""One streamed request to /v1/completions or /v1/chat/completions, timed per token chunk.

aiohttp reads the SSE stream line by line; each `data:` event is stamped with
time.perf_counter() as soon as its line arrives. With vLLM's `return_token_ids` the chunk says
exactly how many tokens it carries; without it each chunk with text counts as one token.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from services.bench.workload import BenchRequest

ENDPOINT_PATHS = {"completions": "/completions", "chat": "/chat/completions"}


SHED_STATUSES = (429, 503)


@dataclass
class RequestResult:
    ok: bool = False
    error: str | None = None
    status: int | None = None  # the HTTP status, when an answer came
    shed: bool = False  # refused for load: 429, or 503 with Retry-After (not a failure)
    latency: float | None = None  # seconds, send -> the whole answer (for any answer)
    ttft: float | None = None  # seconds, send -> first chunk carrying a token
    e2e: float | None = None  # seconds, send -> end of stream
    itl: list[float] = field(default_factory=list)  # seconds, one gap per token after the first
    output_tokens: int = 0  # from usage when the server sends it, else counted
    prompt_tokens: int = 0  # from usage, else the known prompt length, else 0
    counted_tokens: int = 0  # tokens seen in the stream
    exact_token_counts: bool = False  # the chunks carried token_ids
    output_ids: list[int] = field(default_factory=list)  # when the chunks carried token_ids
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if sent
    sent_at: float = 0.0  # time.perf_counter() when the request went out
    arrivals: list[float] = field(default_factory=list)  # perf_counter of each token chunk

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def build_payload(
    endpoint: str, model: str, request: BenchRequest, *, vllm_extras: bool = True
) -> dict[str, Any]:
    """The JSON body: streamed, greedy, usage in the last chunk, max_tokens from the request.

    vllm_extras adds `ignore_eos` (output runs to max_tokens) and `return_token_ids`.
    """
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "completions":
        body["prompt"] = request.prompt
    elif endpoint == "chat":
        if not isinstance(request.prompt, str):
            raise ValueError("the chat endpoint needs text prompts, not token ids")
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        raise ValueError(f"unknown endpoint {endpoint!r} (known: {', '.join(ENDPOINT_PATHS)})")
    if vllm_extras:
        body["ignore_eos"] = True
        body["return_token_ids"] = True
    return body


def _chunk_tokens(choice: dict[str, Any]) -> tuple[int, bool]:
    """(tokens in this chunk, whether the count is exact from token_ids)."""
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids), True
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    return (1 if text else 0), False


def _error_message(body: str, status: int) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.strip()[:200]
    return f"HTTP {status}: {message}"


class _Timing:
    """Folds token chunks into TTFT and per-token gaps."""

    def __init__(self, start: float, result: RequestResult):
        self.start = start
        self.result = result
        self.last: float | None = None

    def tokens(self, now: float, count: int) -> None:
        if count <= 0:
            return
        r = self.result
        r.arrivals.append(now)
        if self.last is None:
            r.ttft = now - self.start
            r.itl.extend([0.0] * (count - 1))  # the rest of the first chunk came with it
        else:  # a chunk of k tokens after gap g counts as k gaps of g/k
            r.itl.extend([(now - self.last) / count] * count)
        self.last = now
        r.counted_tokens += count


async def _read_stream(resp: aiohttp.ClientResponse, timing: _Timing) -> None:
    """Until [DONE]; a stream that closes after a choice's finish_reason without it (as
    `transformers serve` does) is complete too, ended at that last event."""
    r = timing.result
    finished_at: float | None = None
    async for raw in resp.content:
        now = time.perf_counter()
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments, `event:` lines
        data = line[5:].strip()
        if data == b"[DONE]":
            r.e2e = now - timing.start
            return
        event = json.loads(data)
        if not isinstance(event, dict):
            raise ValueError(f"event is not a JSON object: {data[:100]!r}")
        if "error" in event:
            err = event["error"]
            raise RuntimeError(err.get("message", str(err)) if isinstance(err, dict) else err)
        for choice in event.get("choices") or []:
            count, exact = _chunk_tokens(choice)
            r.exact_token_counts |= exact
            if exact:
                r.output_ids.extend(choice["token_ids"])
            timing.tokens(now, count)
            if choice.get("finish_reason") is not None:
                finished_at = now
        usage = event.get("usage")
        if usage:
            r.output_tokens = int(usage.get("completion_tokens") or 0)
            r.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and details.get("cached_tokens") is not None:
                r.cached_tokens = int(details["cached_tokens"])
    if finished_at is None:
        raise RuntimeError("stream ended without [DONE] or a finish_reason")
    r.e2e = finished_at - timing.start


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    *,
    timeout_s: float,
    prompt_len: int | None = None,
    headers: dict[str, str] | None = None,
) -> RequestResult:
    """Send one streamed request; never raises, failures land in result.error."""
    start = time.perf_counter()
    result = RequestResult(sent_at=start)
    timing = _Timing(start, result)
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json=body, headers=headers) as resp:
                result.status = resp.status
                if resp.status != 200:
                    result.error = _error_message(await resp.text(), resp.status)
                    result.latency = time.perf_counter() - start
                    result.shed = resp.status == 429 or (
                        resp.status in SHED_STATUSES and "Retry-After" in resp.headers
                    )
                    return result
                await _read_stream(resp, timing)
                result.latency = time.perf_counter() - start
    except TimeoutError:
        result.error = f"timed out after {timeout_s:g}s"
    except (aiohttp.ClientError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if result.error is not None:
        return result
    if not result.output_tokens:
        result.output_tokens = result.counted_tokens
    if not result.prompt_tokens:
        result.prompt_tokens = prompt_len or 0
    if result.counted_tokens == 0:
        result.error = "no tokens in the stream"
        return result
    result.ok = True
    return result
