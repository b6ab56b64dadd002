"""The demo topology end to end: five services as OS processes over a real nats-server, the
official OpenAI client over real HTTP, prefill in vLLM's FLASH_ATTN layout (block 16) and decode
in vllm-ascend's (separate K/V, block 128) with the converter between them. The oracle is
Hugging Face transformers' greedy generate on the same weights."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

from services.bench.oracle import hf_greedy
from services.cli.topology import DEMO_TOPOLOGY
from tests.system import RunningSystem, connected_stream, run_system

pytestmark = pytest.mark.slow

PREFILL, DECODE = "p-nvidia-0", "d-ascend-0"


@pytest.fixture(scope="module")
def demo(nats_server, tiny_llama: Path, otlp_receiver, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    topology = yaml.safe_load(DEMO_TOPOLOGY.read_text())
    topology["model"] = str(tiny_llama)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    with run_system(topology, nats_server.url, tmp_path_factory.mktemp("demo"), env) as system:
        yield system


@pytest.fixture
def client(demo: RunningSystem) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=demo.base_url, api_key="unused", max_retries=0)


GREEDY = {"temperature": 0, "extra_body": {"return_token_ids": True, "ignore_eos": True}}


async def test_chat_completion_streamed_and_not(client: openai.AsyncOpenAI) -> None:
    messages = [{"role": "user", "content": "Tell me about the river and the hill."}]
    whole = await client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=16, **GREEDY
    )
    choice = whole.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 16
    prompt_ids = whole.model_extra["prompt_token_ids"]
    assert whole.usage.prompt_tokens == len(prompt_ids)
    stream = await client.chat.completions.create(
        model="tiny-llama",
        messages=messages,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]


async def test_greedy_tokens_equal_transformers(
    client: openai.AsyncOpenAI, demo: RunningSystem
) -> None:
    rng = random.Random(7)
    for length in (1, 17, 130, 300):  # inside one block, across 16- and 128-token blocks
        prompt = [rng.randrange(5, 1000) for _ in range(length)]
        reply = await client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=32, **GREEDY
        )
        got = reply.choices[0].model_extra["token_ids"]
        assert got == hf_greedy(demo.model_dir, prompt, 32), f"prompt of {length} tokens"
        assert reply.usage.prompt_tokens == length


async def test_chat_tokens_equal_transformers(
    client: openai.AsyncOpenAI, demo: RunningSystem
) -> None:
    reply = await client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "What is a small model?"}],
        max_tokens=32,
        **GREEDY,
    )
    prompt_ids = reply.model_extra["prompt_token_ids"]
    assert reply.choices[0].model_extra["token_ids"] == hf_greedy(demo.model_dir, prompt_ids, 32)


async def test_32_concurrent_streams_batch_and_match(
    client: openai.AsyncOpenAI, demo: RunningSystem
) -> None:
    rng = random.Random(11)
    jobs = [
        ([rng.randrange(5, 1000) for _ in range(rng.randrange(3, 200))], rng.randrange(8, 40))
        for _ in range(32)
    ]

    async def one(prompt: list[int], max_tokens: int) -> list[int]:
        stream = await client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=max_tokens, stream=True, **GREEDY
        )
        # vLLM's streamed chunks carry token_ids; a chunk that only closes the stream may not
        return [
            t
            async for chunk in stream
            for choice in chunk.choices
            for t in (choice.model_extra.get("token_ids") or [])
        ]

    results = await asyncio.gather(*(one(p, n) for p, n in jobs))
    for (prompt, max_tokens), got in zip(jobs, results, strict=True):
        assert got == hf_greedy(demo.model_dir, prompt, max_tokens)
    stats = await demo.stats(DECODE)
    # The decode worker reports the largest batch it has stepped: continuous batching happened.
    assert stats.peak_running > 1, stats
    assert stats.free_blocks == stats.total_blocks


BAD_REQUESTS = [
    ("/completions", b"{not json", 400, None),
    ("/completions", {"model": "tiny-llama"}, 400, "prompt"),
    ("/chat/completions", {"model": "tiny-llama"}, 400, "messages"),
    ("/completions", {"model": "tiny-llama", "prompt": 5}, 400, "prompt"),
    (
        "/completions",
        {"model": "tiny-llama", "prompt": "hi", "max_tokens": "many"},
        400,
        "max_tokens",
    ),
    ("/completions", {"model": "tiny-llama", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (
        "/completions",
        {"model": "tiny-llama", "prompt": "hi", "temperature": -1},
        400,
        "temperature",
    ),
    ("/completions", {"model": "tiny-llama", "prompt": [1] * 3000}, 400, "prompt"),
    ("/completions", {"model": "tiny-llama", "prompt": "hi", "max_tokens": 5000}, 400, None),
    ("/completions", {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    ("/completions", {"model": "tiny-llama", "prompt": [5, 99999]}, 400, "prompt"),
    ("/completions", {"model": "tiny-llama", "prompt": [5, -1]}, 400, "prompt"),
    ("/chat/completions", {"model": "tiny-llama", "messages": "hello"}, 400, "messages"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
async def test_bad_input_gets_openai_error_and_server_stays_healthy(
    demo: RunningSystem, path: str, body: object, status: int, param: str | None
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http:
        async with http.post(
            demo.base_url + path, data=data, headers={"Content-Type": "application/json"}
        ) as reply:
            assert reply.status == status
            error = (await reply.json())["error"]
            assert error["message"] and error["type"]
            assert set(error) >= {"message", "type", "param", "code"}
            if param is not None:
                assert error["param"] == param
        async with http.get(f"http://127.0.0.1:{demo.port}/health") as health:
            assert health.status == 200


async def test_client_disconnect_frees_kv_blocks(demo: RunningSystem) -> None:
    body = {
        "model": "tiny-llama",
        "prompt": list(range(5, 205)),
        "max_tokens": 1500,
        "stream": True,
        "ignore_eos": True,
    }
    async with connected_stream(demo.base_url, body):
        busy = await demo.stats(DECODE)
        assert busy.free_blocks < busy.total_blocks  # the request holds blocks now
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stats = await demo.stats(DECODE)
        if stats.free_blocks == stats.total_blocks and stats.running == 0:
            break
        await asyncio.sleep(0.2)
    assert stats.free_blocks == stats.total_blocks, stats
    assert stats.running == 0
    prefill = await demo.stats(PREFILL)
    assert prefill.free_blocks == prefill.total_blocks


async def test_one_trace_spans_all_five_services(
    client: openai.AsyncOpenAI,
    otlp_receiver,  # noqa: ANN001
) -> None:
    reply = await client.completions.create(
        model="tiny-llama", prompt="one trace", max_tokens=4, **GREEDY
    )
    services = {
        "hetserve-gateway",
        "hetserve-scheduler",
        "hetserve-prefill",
        "hetserve-converter",
        "hetserve-decode",
    }
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        spans = otlp_receiver.snapshot()
        roots = [
            s
            for s in spans
            if s["name"] == "gateway.request" and s["attributes"].get("request.id") == reply.id
        ]
        if roots:
            trace = [s for s in spans if s["trace_id"] == roots[0]["trace_id"]]
            if {s["service"] for s in trace} >= services:
                break
        await asyncio.sleep(0.3)
    assert roots, "no gateway.request span for this request"
    names = {(s["service"], s["name"]) for s in trace}
    assert {s for s, _ in names} >= services, names
    for expected in (
        "scheduler.route",
        "prefill.run",
        "kv.send",
        "converter.convert",
        "decode.admit",
        "decode.generate",
    ):
        assert expected in {n for _, n in names}, names
    # One tree: gateway.request is the root and every other span hangs from a span of the
    # trace, following the request's path across processes.
    by_id = {s["span_id"]: s for s in trace}
    parent = {s["name"]: by_id.get(s["parent_id"], {}).get("name") for s in trace}
    assert roots[0]["parent_id"] == ""
    assert all(s["parent_id"] in by_id for s in trace if s is not roots[0]), trace
    assert parent["scheduler.route"] == "gateway.request"
    assert parent["prefill.run"] == "scheduler.route"
    assert parent["kv.send"] == "prefill.run"
    assert parent["converter.convert"] == "kv.send"
    assert parent["decode.admit"] == "scheduler.route"
    assert parent["decode.generate"] == "converter.convert"
