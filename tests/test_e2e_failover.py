"""Instances die: a request whose decode worker is killed resumes on another one with the
same tokens, other requests are untouched, and without any prefill instance a request fails
with a clear error in bounded time instead of hanging."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from services.bench.oracle import hf_greedy
from tests.system import RunningSystem, run_system

pytestmark = pytest.mark.slow

DECODES = ("d-a-0", "d-b-0")


@pytest.fixture(scope="module")
def pair_system(nats_server, tiny_llama: Path, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    topology = {
        "model": str(tiny_llama),
        "prefill": [{"name": "p", "kv_layout": "vllm-flash", "block_size": 16}],
        "decode": [
            {"name": "d-a", "kv_layout": "vllm-flash", "block_size": 16},
            {"name": "d-b", "kv_layout": "vllm-flash", "block_size": 16},
        ],
        "converter": {"replicas": 1},
    }
    # Without restarts: a killed instance stays dead (tests/test_e2e_up_restart.py covers
    # `hetserve up` bringing it back), else a restarted prefill can serve the request that
    # must fail.
    workdir = tmp_path_factory.mktemp("failover")
    with run_system(topology, nats_server.url, workdir, up_args=["--no-restart"]) as system:
        yield system


def _client(system: RunningSystem) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=system.base_url, api_key="unused", max_retries=0, timeout=120
    )


async def _stream_tokens(
    client: openai.AsyncOpenAI,
    prompt: list[int],
    n: int,
    started: asyncio.Event | None = None,
    arrivals: list[float] | None = None,
) -> list[int]:
    stream = await client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=n,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    tokens: list[int] = []
    async for chunk in stream:
        for choice in chunk.choices:
            tokens.extend(choice.model_extra.get("token_ids") or [])
        if arrivals is not None:
            arrivals.append(time.monotonic())
        if started is not None and len(tokens) >= 10:
            started.set()
    return tokens


async def test_killed_decode_worker_request_resumes_elsewhere(pair_system: RunningSystem) -> None:
    client = _client(pair_system)
    prompt = list(range(40, 140))
    started = asyncio.Event()
    arrivals: list[float] = []
    victim_task = asyncio.create_task(_stream_tokens(client, prompt, 200, started, arrivals))
    await asyncio.wait_for(started.wait(), 60)
    stats = {d: await pair_system.stats(d) for d in DECODES}
    serving = [d for d, s in stats.items() if s.running > 0]
    assert len(serving) == 1, stats
    survivor = next(d for d in DECODES if d not in serving)
    began = time.monotonic()
    os.kill(stats[serving[0]].pid, signal.SIGKILL)
    # Meanwhile a new request is served by the survivor, unaffected.
    other = await _stream_tokens(client, [7, 8, 9], 16)
    assert other == hf_greedy(pair_system.model_dir, [7, 8, 9], 16)
    tokens = await asyncio.wait_for(victim_task, 180)
    assert tokens == hf_greedy(pair_system.model_dir, prompt, 200)
    # The stream stalled once, from the kill until the retry on the survivor produced tokens:
    # the registry TTL (4 s) plus a new prefill, bounded well below the request timeouts.
    resumed = next(t for t in arrivals if t > began)
    assert resumed - began < 30, resumed - began
    after = await pair_system.stats(survivor)
    assert after.free_blocks == after.total_blocks


async def test_without_prefill_a_request_fails_clearly(pair_system: RunningSystem) -> None:
    prefill = await pair_system.stats("p-0")
    os.kill(prefill.pid, signal.SIGKILL)
    await asyncio.sleep(5)  # the registry forgets it after the heartbeat TTL
    client = _client(pair_system)
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as failure:
        await client.completions.create(model="tiny-llama", prompt="hello", max_tokens=4)
    assert failure.value.status_code == 503
    assert "prefill" in failure.value.message
    assert time.monotonic() - began < 30
