"""API keys and admission against the whole system: the demo topology under `hetserve up
--api-key` with small admission bounds (3 in flight, 2 queued, 1.5 s queue budget, 2 per key),
the official OpenAI client and raw HTTP. Every request overloading it gets either its whole
completion or a 429/503 with Retry-After and an OpenAI error body, within timeouts; nothing
hangs, nothing leaks (the decode instance gets every KV block back)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.bench.oracle import hf_greedy
from services.cli.topology import DEMO_TOPOLOGY
from tests.system import RunningSystem, run_system

pytestmark = pytest.mark.slow

KEYS = [f"sk-e2e-{i}-{uuid.uuid4().hex}" for i in range(8)]
QUEUE_WAIT_S = 1.5
LIMITS = {
    "HETSERVE_MAX_INFLIGHT_REQUESTS": "3",
    "HETSERVE_MAX_QUEUED_REQUESTS": "2",
    "HETSERVE_MAX_QUEUE_WAIT_S": str(QUEUE_WAIT_S),
    "HETSERVE_MAX_REQUESTS_PER_KEY": "2",
}
DECODE = "d-ascend-0"
LONG = 1500  # output tokens: seconds of decoding, so a stream holds its slot while it is open


@pytest.fixture(scope="module")
def guarded(nats_server, tiny_llama: Path, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    topology = yaml.safe_load(DEMO_TOPOLOGY.read_text())
    topology["model"] = str(tiny_llama)
    workdir = tmp_path_factory.mktemp("admission")
    up_args = ["--api-key", ",".join(KEYS)]
    with run_system(topology, nats_server.url, workdir, LIMITS, up_args=up_args) as system:
        yield system


def body(max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "model": "tiny-llama",
        "prompt": [5, 6, 7],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": stream,
    }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Answer:
    status: int
    seconds: float
    retry_after: str | None
    error: dict[str, Any] | None = None
    token_ids: list[int] | None = None  # a completion's, when status is 200


async def request(
    http: aiohttp.ClientSession, system: RunningSystem, key: str, payload: dict[str, Any]
) -> Answer:
    began = time.monotonic()
    url = f"{system.base_url}/completions"
    async with http.post(url, json=payload, headers=bearer(key)) as reply:
        raw = await reply.read()
        answer = Answer(reply.status, time.monotonic() - began, reply.headers.get("Retry-After"))
    if answer.status != 200:
        answer.error = json.loads(raw)["error"]
        return answer
    if not payload["stream"]:
        answer.token_ids = json.loads(raw)["choices"][0]["token_ids"]
        return answer
    events = [e.removeprefix(b"data: ") for e in raw.strip().split(b"\n\n")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    answer.token_ids = [t for c in chunks for t in c["choices"][0].get("token_ids") or []]
    return answer


@asynccontextmanager
async def held_stream(system: RunningSystem, key: str) -> AsyncIterator[None]:
    """A long stream, open (holding its slot) from its first token until the block ends;
    leaving the block drops the connection, which aborts the request."""
    async with aiohttp.ClientSession() as http:
        url = f"{system.base_url}/completions"
        async with http.post(url, json=body(LONG), headers=bearer(key)) as reply:
            assert reply.status == 200, await reply.text()
            async for line in reply.content:
                if line.startswith(b"data:"):
                    break
            yield


async def scrape(system: RunningSystem) -> dict[tuple[str, tuple], float]:
    """The gateway's own /metrics, on its API port (open without a key)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{system.port}/metrics") as reply:
            assert reply.status == 200
            text = await reply.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def shed_total(samples: dict[tuple[str, tuple], float]) -> float:
    return sum(v for (name, _), v in samples.items() if name == "hetserve_shed_requests_total")


async def all_blocks_free(system: RunningSystem, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        info = await system.stats(DECODE)
        if info.free_blocks == info.total_blocks and info.running == 0:
            return
        assert time.monotonic() < deadline, f"blocks still held: {info}"
        await asyncio.sleep(0.3)


def assert_shed(answer: Answer, codes: set[str]) -> None:
    assert answer.status in (429, 503), answer
    assert answer.retry_after is not None and int(answer.retry_after) >= 1, answer
    assert answer.error is not None and set(answer.error) == {"message", "type", "param", "code"}
    assert answer.error["code"] in codes, answer
    expected_type = "rate_limit_error" if answer.status == 429 else "server_error"
    assert answer.error["type"] == expected_type, answer


async def test_the_openai_client_needs_a_configured_key(guarded: RunningSystem) -> None:
    prompt = [5, 6, 7]
    async with openai.AsyncOpenAI(
        base_url=guarded.base_url, api_key=KEYS[3], max_retries=0
    ) as client:
        done = await client.completions.create(
            model="tiny-llama",
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        assert done.choices[0].model_extra["token_ids"] == hf_greedy(guarded.model_dir, prompt, 8)
    # Wrong keys, then no key at all (the client's Authorization header left out).
    for wrong, headers in [
        ("sk-wrong", {}),
        (KEYS[3][:-1], {}),
        (KEYS[3] + "x", {}),
        (KEYS[3], {"Authorization": openai.omit}),
    ]:
        async with openai.AsyncOpenAI(
            base_url=guarded.base_url, api_key=wrong, max_retries=0
        ) as client:
            with pytest.raises(openai.AuthenticationError) as raised:
                await client.chat.completions.create(
                    model="tiny-llama",
                    messages=[{"role": "user", "content": "hi"}],
                    extra_headers=headers,
                )
        assert raised.value.status_code == 401
        assert isinstance(raised.value.body, dict)
        assert raised.value.body["type"] == "authentication_error"
        expected = "Missing API key" if headers else "Incorrect API key"
        assert raised.value.body["message"].startswith(expected)
    # Probes and scrapers need no key.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{guarded.port}/health") as reply:
            assert reply.status == 200
    assert (await scrape(guarded))[("hetserve_unauthorized_requests_total", ())] >= 4
    log = guarded.log_text()
    assert not any(key in log for key in KEYS)


async def test_overload_every_request_is_served_or_shed(guarded: RunningSystem) -> None:
    shed_before = shed_total(await scrape(guarded))
    async with aiohttp.ClientSession() as http:
        answers = await asyncio.wait_for(
            asyncio.gather(
                # two per key: the per-key limit stays out of this test's way
                *(request(http, guarded, KEYS[i % len(KEYS)], body(64)) for i in range(16))
            ),
            180,
        )
    served = [a for a in answers if a.status == 200]
    shed = [a for a in answers if a.status != 200]
    expected = hf_greedy(guarded.model_dir, [5, 6, 7], 64)
    assert all(answer.token_ids == expected for answer in served)
    for answer in shed:
        assert_shed(answer, {"queue_full", "queue_timeout"})
        if answer.error and answer.error["code"] == "queue_full":
            assert answer.seconds < 5, answer  # at once, not after a wait
    # 3 in flight and 2 queued at once; a few more may start as the first ones finish
    assert len(served) >= 3 and len(shed) >= 16 - 3 - 2 - 3, [a.status for a in answers]
    assert shed_total(await scrape(guarded)) - shed_before == len(shed)
    await all_blocks_free(guarded)
    async with aiohttp.ClientSession() as http:  # and it still serves
        assert (await request(http, guarded, KEYS[0], body(4))).status == 200


async def test_one_key_cannot_take_every_slot(guarded: RunningSystem) -> None:
    async with held_stream(guarded, KEYS[0]), held_stream(guarded, KEYS[0]):
        async with aiohttp.ClientSession() as http:
            refused = await request(http, guarded, KEYS[0], body(4))
            assert_shed(refused, {"key_limit"})
            assert refused.status == 429 and refused.seconds < 5
            other = await request(http, guarded, KEYS[1], body(4, stream=False))
            assert other.status == 200, other
    await all_blocks_free(guarded)


async def test_a_request_that_cannot_start_in_its_budget_is_503(guarded: RunningSystem) -> None:
    async with (
        held_stream(guarded, KEYS[0]),
        held_stream(guarded, KEYS[1]),
        held_stream(guarded, KEYS[2]),
    ):
        async with aiohttp.ClientSession() as http:
            waited = await asyncio.wait_for(request(http, guarded, KEYS[3], body(4)), 60)
    assert_shed(waited, {"queue_timeout"})
    assert waited.status == 503
    assert QUEUE_WAIT_S <= waited.seconds < QUEUE_WAIT_S + 5, waited
    await all_blocks_free(guarded)
    async with aiohttp.ClientSession() as http:
        assert (await request(http, guarded, KEYS[3], body(4))).status == 200
