"""`hetserve bench serve`: send a workload to an OpenAI-compatible endpoint and summarize it.

Open loop (`rate`): requests leave at Poisson arrival times whatever the server's state.
Closed loop (`concurrency`): C workers, each sending its next request when the last finished.
Every request has a timeout, so a run always ends. Warmup requests go first, one at a time,
and are not counted.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import numpy as np

from services.bench.client import ENDPOINT_PATHS, RequestResult, build_payload, send_request
from services.bench.conversations import conversations, flatten, run_conversation
from services.bench.distributions import parse_distribution
from services.bench.stats import RunSummary, summarize
from services.bench.workload import (
    BenchRequest,
    dataset_requests,
    load_dataset,
    poisson_offsets,
    synthetic_requests,
)


class EndpointError(Exception):
    """The endpoint could not be asked for its models."""


@dataclass(frozen=True)
class BenchConfig:
    base_url: str
    num_requests: int
    rate: float | None = None  # requests/s, Poisson arrivals
    concurrency: int | None = None  # closed loop; exactly one of rate / concurrency
    model: str | None = None  # None: the first of /v1/models
    endpoint: str = "completions"
    prompt_tokens: str = "fixed:128"
    output_tokens: str = "fixed:128"
    dataset: str | None = None
    vocab_size: int = 1000
    seed: int = 0
    warmup: int = 0
    timeout: float = 300.0  # seconds per request
    api_key: str | None = None
    vllm_extras: bool = True  # ignore_eos and return_token_ids in the request body
    # KV reuse workloads (token-id prompts on completions): every prompt starts with the same
    # `shared_prefix` tokens; conversations of `turns` turns, each turn's prompt the whole
    # conversation so far plus `prompt_tokens` new tokens
    turns: int = 1
    shared_prefix: int = 0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate and concurrency")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINT_PATHS)}")
        parse_distribution(self.prompt_tokens)
        parse_distribution(self.output_tokens)
        if self.turns < 1 or self.shared_prefix < 0:
            raise ValueError("turns must be >= 1 and shared_prefix >= 0")
        if self.conversational and (self.endpoint != "completions" or self.dataset):
            raise ValueError(
                "turns and shared_prefix need synthetic token-id prompts (completions)"
            )
        if self.conversational and not self.vllm_extras:
            raise ValueError("a conversation's next turn needs return_token_ids (vllm extras)")

    @property
    def conversational(self) -> bool:
        return self.turns > 1 or self.shared_prefix > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        if self.rate is not None and math.isinf(self.rate):
            d["rate"] = "inf"
        return d


@dataclass(frozen=True)
class BenchRun:
    config: BenchConfig
    model: str
    summary: RunSummary
    results: list[RequestResult]  # in workload order

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "model": self.model, **self.summary.to_dict()}


def build_workload(
    config: BenchConfig, rng: np.random.Generator, n: int | None = None
) -> list[BenchRequest]:
    """The requests to send, from the dataset if one is given, else synthetic."""
    n = config.num_requests if n is None else n
    output_dist = parse_distribution(config.output_tokens)
    if config.dataset:
        requests = dataset_requests(rng, n, load_dataset(config.dataset), output_dist)
        if config.endpoint == "chat" and any(isinstance(r.prompt, list) for r in requests):
            raise ValueError(f"{config.dataset}: the chat endpoint needs text prompts, not ids")
        return requests
    return synthetic_requests(
        rng,
        n,
        parse_distribution(config.prompt_tokens),
        output_dist,
        token_ids=config.endpoint == "completions",
        vocab_size=config.vocab_size,
    )


async def first_model(session: aiohttp.ClientSession, base_url: str, timeout_s: float) -> str:
    """The id of the first model /v1/models lists. Raises EndpointError."""
    url = base_url.rstrip("/") + "/models"
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url) as resp:
                resp.raise_for_status()
                models = (await resp.json())["data"]
        return str(models[0]["id"])
    except TimeoutError:
        raise EndpointError(f"GET {url}: timed out after {timeout_s:g}s") from None
    except (aiohttp.ClientError, ValueError, KeyError, IndexError, TypeError) as e:
        raise EndpointError(f"GET {url}: {type(e).__name__}: {e}") from None


class _Sender:
    def __init__(self, session: aiohttp.ClientSession, config: BenchConfig, model: str):
        self.session = session
        self.config = config
        self.model = model
        self.url = config.base_url.rstrip("/") + ENDPOINT_PATHS[config.endpoint]
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None

    async def send(self, request: BenchRequest) -> RequestResult:
        body = build_payload(
            self.config.endpoint, self.model, request, vllm_extras=self.config.vllm_extras
        )
        return await send_request(
            self.session,
            self.url,
            body,
            timeout_s=self.config.timeout,
            prompt_len=request.prompt_len,
            headers=self.headers,
        )


async def _open_loop(
    sender: _Sender, requests: Sequence[BenchRequest], offsets: np.ndarray
) -> list[RequestResult]:
    start = time.perf_counter()
    tasks = []
    for request, offset in zip(requests, offsets, strict=True):
        delay = start + float(offset) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(sender.send(request)))
    return list(await asyncio.gather(*tasks))


async def _closed_loop(
    sender: _Sender, requests: Sequence[BenchRequest], concurrency: int
) -> list[RequestResult]:
    results: list[RequestResult | None] = [None] * len(requests)
    pending = iter(range(len(requests)))

    async def worker() -> None:
        for i in pending:  # the shared iterator hands each index to one worker
            results[i] = await sender.send(requests[i])

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return [r for r in results if r is not None]


async def _conversations(
    sender: _Sender, config: BenchConfig, rng: np.random.Generator, arrivals: np.random.Generator
) -> list[RequestResult]:
    """Conversations in a closed loop (`concurrency` at a time) or starting at Poisson times."""
    talks = conversations(
        rng, config.num_requests, config.turns, config.shared_prefix,
        parse_distribution(config.prompt_tokens), parse_distribution(config.output_tokens),
        config.vocab_size,
    )  # fmt: skip
    if config.concurrency is not None:
        results: list[list[RequestResult]] = [[] for _ in talks]
        pending = iter(range(len(talks)))

        async def worker() -> None:
            for i in pending:
                results[i] = await run_conversation(talks[i], sender.send)

        await asyncio.gather(*(worker() for _ in range(min(config.concurrency, len(talks)))))
        return flatten(results)
    rate = config.rate if config.rate is not None else math.inf
    start, tasks = time.perf_counter(), []
    for talk, offset in zip(talks, poisson_offsets(arrivals, len(talks), rate), strict=True):
        delay = start + float(offset) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(run_conversation(talk, sender.send)))
    return flatten(await asyncio.gather(*tasks))


async def run_benchmark(config: BenchConfig) -> BenchRun:
    """Warm up, run the workload, summarize. Raises EndpointError, ValueError."""
    workload_seed, arrival_seed, warmup_seed = np.random.SeedSequence(config.seed).spawn(3)
    requests = build_workload(config, np.random.default_rng(workload_seed))
    warmup = build_workload(config, np.random.default_rng(warmup_seed), config.warmup)
    connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue behind a pool limit
    async with aiohttp.ClientSession(connector=connector) as session:
        model = config.model or await first_model(session, config.base_url, config.timeout)
        sender = _Sender(session, config, model)
        for request in warmup:
            await sender.send(request)
        start = time.perf_counter()
        if config.conversational:
            rng = np.random.default_rng(workload_seed)
            results = await _conversations(sender, config, rng, np.random.default_rng(arrival_seed))
        elif config.concurrency is not None:
            results = await _closed_loop(sender, requests, config.concurrency)
        else:
            rate = config.rate if config.rate is not None else math.inf
            offsets = poisson_offsets(np.random.default_rng(arrival_seed), len(requests), rate)
            results = await _open_loop(sender, requests, offsets)
        duration = time.perf_counter() - start
    return BenchRun(config, model, summarize(results, duration), results)
