"""hetserve bench serve: distributions, percentiles, arrivals, and runs against a fake server.

The fake server speaks OpenAI's streaming format with an injected time to first token and a
fixed gap between chunks; it tests the load generator, not hetserve's gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web

from services.bench import cli
from services.bench.client import RequestResult
from services.bench.distributions import Fixed, LogNormal, Normal, Uniform, parse_distribution
from services.bench.report import format_table, to_json
from services.bench.serve import BenchConfig, EndpointError, run_benchmark
from services.bench.stats import LatencyStats, percentile, summarize
from services.bench.workload import (
    FIRST_SAFE_TOKEN_ID,
    dataset_requests,
    load_dataset,
    poisson_offsets,
    synthetic_requests,
)

TTFT_S = 0.15  # the fake server's delay before the first chunk
CHUNK_GAP_S = 0.02  # between later chunks
TOKENS_PER_CHUNK = 2


# --- distributions ---------------------------------------------------------------------------


def test_parse_distributions() -> None:
    assert parse_distribution("fixed:128") == Fixed(128)
    assert parse_distribution("64") == Fixed(64)
    assert parse_distribution("uniform:64, 256") == Uniform(64, 256)
    assert parse_distribution("normal:128,32") == Normal(128.0, 32.0)
    assert parse_distribution("lognormal:100,0.5") == LogNormal(100.0, 0.5)


@pytest.mark.parametrize(
    "spec",
    ["", "fixed", "fixed:0", "fixed:1,2", "uniform:5", "uniform:9,3", "uniform:0,3",
     "normal:1,-1", "lognormal:0,1", "zipf:1", "fixed:abc"],
)  # fmt: skip
def test_bad_distributions_raise_value_error(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_distribution(spec)


@pytest.mark.parametrize("spec", ["fixed:7", "uniform:3,9", "normal:20,30", "lognormal:50,1"])
def test_sampling_is_seeded_and_at_least_one(spec: str) -> None:
    dist = parse_distribution(spec)
    a = dist.sample(np.random.default_rng(5), 2000)
    b = dist.sample(np.random.default_rng(5), 2000)
    assert a.dtype == np.int64 and a.shape == (2000,)
    assert np.array_equal(a, b)
    assert a.min() >= 1
    if not spec.startswith("fixed"):
        assert not np.array_equal(a, dist.sample(np.random.default_rng(6), 2000))


def test_sample_ranges_and_means() -> None:
    rng = np.random.default_rng(0)
    u = Uniform(3, 9).sample(rng, 20000)
    assert set(np.unique(u)) == set(range(3, 10))  # both ends included
    assert abs(Normal(128, 32).sample(rng, 20000).mean() - 128) < 1.5
    clipped = Normal(1, 10).sample(rng, 1000)
    assert clipped.min() == 1
    assert abs(LogNormal(200, 0.5).sample(rng, 50000).mean() - 200) < 4  # mean in tokens


# --- percentiles and summary -----------------------------------------------------------------


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([3, 1, 2], 0) == 1 and percentile([3, 1, 2], 100) == 3
    assert np.isnan(percentile([], 50))
    values = np.random.default_rng(1).exponential(size=101).tolist()
    for q in (50, 90, 99, 12.5):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_summarize_counts_only_successes() -> None:
    ok = RequestResult(
        ok=True, ttft=0.1, e2e=0.4, itl=[0.1, 0.1, 0.1], output_tokens=4, prompt_tokens=10
    )
    failed = RequestResult(error="HTTP 500: boom")
    s = summarize([ok, ok, failed], duration_s=2.0)
    assert (s.requests_ok, s.requests_failed) == (2, 1)
    assert s.output_tokens == 8 and s.prompt_tokens == 20
    assert s.request_throughput == 1.0 and s.total_token_throughput == 14.0
    assert s.ttft.mean == pytest.approx(100) and s.tpot.p50 == pytest.approx(100)
    assert s.errors == {"HTTP 500: boom": 1}
    assert np.isnan(LatencyStats.of_seconds([]).p99)


# --- workload and arrivals -------------------------------------------------------------------


def test_poisson_inter_arrival_mean() -> None:
    offsets = poisson_offsets(np.random.default_rng(2), 20001, rate=50.0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.05)  # exponential: std == mean
    assert np.array_equal(offsets, poisson_offsets(np.random.default_rng(2), 20001, 50.0))
    assert not poisson_offsets(np.random.default_rng(2), 5, float("inf")).any()
    with pytest.raises(ValueError):
        poisson_offsets(np.random.default_rng(2), 5, 0)


def test_token_prompts_have_exact_lengths_in_safe_range() -> None:
    reqs = synthetic_requests(
        np.random.default_rng(3), 50, Uniform(1, 40), Fixed(8), token_ids=True, vocab_size=100
    )
    for r in reqs:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len
        assert all(FIRST_SAFE_TOKEN_ID <= t < 100 for t in r.prompt) and r.max_tokens == 8
    text = synthetic_requests(
        np.random.default_rng(3), 3, Fixed(5), Fixed(2), token_ids=False, vocab_size=100
    )
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == 5 for r in text)


def test_dataset_rows(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "hi there", "max_tokens": 3}\n\n{"prompt": [11, 12]}\n')
    rows = load_dataset(path)
    reqs = dataset_requests(np.random.default_rng(0), 3, rows, Fixed(9))
    assert [(r.prompt, r.max_tokens, r.prompt_len) for r in reqs] == [
        ("hi there", 3, None),
        ([11, 12], 9, 2),
        ("hi there", 3, None),
    ]
    for bad in ['{"prompt": 5}', '{"prompt": "x", "max_tokens": 0}', "not json", "[1]", ""]:
        path.write_text(bad + "\n")
        with pytest.raises(ValueError):
            load_dataset(path)


# --- runs against a fake OpenAI streaming server ---------------------------------------------


@dataclass
class FakeServer:
    url: str
    bodies: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


async def _stream(request: web.Request, server: FakeServer, chat: bool) -> web.StreamResponse:
    body = await request.json()
    server.bodies.append(body)
    prompt = body["messages"][-1]["content"] if chat else body["prompt"]
    if prompt == "fail":
        return web.json_response({"error": {"message": "bad prompt", "code": 400}}, status=400)
    if prompt in ("busy", "wait"):  # shed for load, as hetserve's gateway does
        status = 429 if prompt == "busy" else 503
        error = {"error": {"message": "at capacity", "code": "queue_full"}}
        return web.json_response(error, status=status, headers={"Retry-After": "1"})
    if prompt == "down":  # a 503 that does not say when to retry: a failure
        return web.json_response({"error": {"message": "no backend"}}, status=503)
    server.in_flight += 1
    server.max_in_flight = max(server.max_in_flight, server.in_flight)
    try:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if chat:  # OpenAI sends the role first, with no content
            await resp.write(_sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
        await asyncio.sleep(TTFT_S)
        n = body["max_tokens"]
        for start in range(0, n, TOKENS_PER_CHUNK):
            if start:
                await asyncio.sleep(CHUNK_GAP_S)
            ids = list(range(start, min(start + TOKENS_PER_CHUNK, n)))
            text = "x" * len(ids)
            if chat:  # no token_ids: the client counts chunks
                choice = {"index": 0, "delta": {"content": text}}
            else:
                choice = {"index": 0, "text": text, "token_ids": ids}
            if prompt == "no-done" and start + TOKENS_PER_CHUNK >= n:
                choice["finish_reason"] = "length"
            await resp.write(_sse({"choices": [choice]}))
        prompt_len = len(prompt) if isinstance(prompt, list) else 3
        usage = {"prompt_tokens": prompt_len, "completion_tokens": n}
        await resp.write(_sse({"choices": [], "usage": usage}))
        # transformers serve closes after its finish_reason without [DONE]; "cut" has neither
        if prompt not in ("no-done", "cut"):
            await resp.write(_sse("[DONE]"))
        return resp
    finally:
        server.in_flight -= 1


@asynccontextmanager
async def fake_openai_server() -> AsyncIterator[FakeServer]:
    server = FakeServer(url="")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _stream(request, server, chat=False)

    async def chat(request: web.Request) -> web.StreamResponse:
        return await _stream(request, server, chat=True)

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        yield server
    finally:
        await runner.cleanup()


async def test_concurrency_run_counts_and_timing() -> None:
    async with fake_openai_server() as server:
        config = BenchConfig(
            base_url=server.url,
            num_requests=9,
            concurrency=3,
            prompt_tokens="uniform:4,12",
            output_tokens="fixed:6",
            warmup=1,
            timeout=10,
        )
        run = await run_benchmark(config)
    s = run.summary
    assert run.model == "fake-model"
    assert (s.requests_ok, s.requests_failed) == (9, 0)
    assert len(server.bodies) == 10  # one warmup + nine measured
    assert server.max_in_flight == 3
    body = server.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["return_token_ids"] is True
    assert body["temperature"] == 0 and body["max_tokens"] == 6
    assert s.output_tokens == 54 and s.exact_token_counts
    assert s.prompt_tokens == sum(r.prompt_tokens for r in run.results) > 0
    assert TTFT_S * 1000 <= s.ttft.p50 < TTFT_S * 1000 + 500
    # 6 tokens in 3 chunks 20 ms apart: TPOT = 40 ms / 5 tokens; each later gap splits in two
    assert 7 <= s.tpot.p50 < 60
    assert s.itl.count == 9 * 5 and 8 <= s.itl.p90 < 60
    assert s.e2e.p50 >= (TTFT_S + 2 * CHUNK_GAP_S) * 1000
    assert "Successful requests:" in format_table(run)
    assert json.loads(to_json(run))["config"]["concurrency"] == 3


async def test_a_stream_ends_at_done_or_at_a_finish_reason(tmp_path: Path) -> None:
    """A stream closed after its finish_reason with no [DONE] (transformers serve's way) is a
    whole answer; one closed with neither was cut off and fails."""
    dataset = tmp_path / "rows.jsonl"
    dataset.write_text('{"prompt": "no-done"}\n{"prompt": "cut"}\n')
    async with fake_openai_server() as server:
        config = BenchConfig(
            base_url=server.url, num_requests=4, concurrency=1, dataset=str(dataset),
            output_tokens="fixed:4", timeout=10,
        )  # fmt: skip
        run = await run_benchmark(config)
    ended, cut = run.results[0::2], run.results[1::2]
    assert all(r.ok and r.output_tokens == 4 and r.e2e is not None for r in ended)
    assert not any(r.ok for r in cut)
    assert run.summary.errors == {"RuntimeError: stream ended without [DONE] or a finish_reason": 2}


async def test_rate_run_with_chat_dataset_and_errors(tmp_path: Path) -> None:
    dataset = tmp_path / "chat.jsonl"
    dataset.write_text('{"prompt": "hello", "max_tokens": 4}\n{"prompt": "fail"}\n')
    async with fake_openai_server() as server:
        config = BenchConfig(
            base_url=server.url,
            model="fake-model",
            endpoint="chat",
            num_requests=6,
            rate=float("inf"),
            dataset=str(dataset),
            timeout=10,
        )
        run = await run_benchmark(config)
    s = run.summary
    assert (s.requests_ok, s.requests_failed) == (3, 3)
    assert s.errors == {"HTTP 400: bad prompt": 3}
    assert server.max_in_flight == 3  # infinite rate: every request at once
    assert s.output_tokens == 12 and not s.exact_token_counts
    assert s.ttft.p50 >= TTFT_S * 1000  # the role-only chunk is not a token
    assert json.loads(to_json(run))["config"]["rate"] == "inf"


async def test_shed_answers_are_counted_apart_from_failures(tmp_path: Path) -> None:
    dataset = tmp_path / "shed.jsonl"
    rows = ["hello", "busy", "wait", "down"]
    dataset.write_text("".join(json.dumps({"prompt": r, "max_tokens": 4}) + "\n" for r in rows))
    async with fake_openai_server() as server:
        config = BenchConfig(
            base_url=server.url,
            model="fake-model",
            endpoint="chat",
            num_requests=8,
            concurrency=2,
            dataset=str(dataset),
            timeout=10,
        )
        run = await run_benchmark(config)
    s = run.summary
    assert (s.requests_ok, s.requests_shed, s.requests_failed) == (2, 4, 2)
    assert [r.status for r in run.results] == [200, 429, 503, 503] * 2
    assert s.shed_latency.count == 4 and 0 < s.shed_latency.p50 < 1000
    assert s.errors == {
        "HTTP 429: at capacity": 2,
        "HTTP 503: at capacity": 2,
        "HTTP 503: no backend": 2,
    }
    table = format_table(run)
    assert "Shed requests (429/503):" in table and "P50 Shed answer (ms):" in table
    assert json.loads(to_json(run))["requests_shed"] == 4


async def test_unreachable_endpoint_and_timeouts() -> None:
    async with fake_openai_server() as server:
        url = server.url
        config = BenchConfig(base_url=url, model="m", num_requests=2, concurrency=2, timeout=0.05)
        run = await run_benchmark(config)
    assert run.summary.requests_failed == 2
    assert all(r.error == "timed out after 0.05s" for r in run.results)
    with pytest.raises(EndpointError):  # the server is gone now
        await run_benchmark(BenchConfig(base_url=url, num_requests=1, concurrency=1, timeout=2))


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        BenchConfig(base_url="x", num_requests=1)  # neither rate nor concurrency
    with pytest.raises(ValueError):
        BenchConfig(base_url="x", num_requests=1, rate=1.0, concurrency=1)
    with pytest.raises(ValueError):
        BenchConfig(base_url="x", num_requests=1, rate=1.0, output_tokens="fixed:0")


async def test_chat_with_token_id_dataset_is_refused_before_sending(tmp_path: Path) -> None:
    dataset = tmp_path / "ids.jsonl"
    dataset.write_text('{"prompt": [11, 12]}\n')
    config = BenchConfig(
        base_url="http://127.0.0.1:9/v1", endpoint="chat", num_requests=1, rate=1.0,
        dataset=str(dataset),
    )  # fmt: skip
    with pytest.raises(ValueError, match="text prompts"):
        await run_benchmark(config)


async def test_cli_json_and_output_file(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="hetserve")
    bench = parser.add_subparsers(dest="command").add_parser("bench")
    cli.register(bench.add_subparsers(dest="bench_command"))
    out = tmp_path / "report.json"
    async with fake_openai_server() as server:
        argv = ["bench", "serve", "--base-url", server.url, "--rate", "100", "--num-requests"]
        argv += ["4", "--output-tokens", "fixed:3", "--seed", "7", "--json", "--output", str(out)]
        args = parser.parse_args(argv)
        code = await asyncio.to_thread(args.func, args)  # the command runs its own event loop
    assert code == cli.EXIT_OK
    report = json.loads(out.read_text())
    assert report["requests_ok"] == 4 and report["output_tokens"] == 12
    assert report["config"]["seed"] == 7 and report["model"] == "fake-model"
    assert set(report["ttft"]) == {"count", "mean", "p50", "p90", "p99"}
    bad = parser.parse_args(["bench", "serve", "--rate", "1", "--num-requests", "0"])
    assert bad.func(bad) == cli.EXIT_BAD_CONFIG


async def test_conversations_send_the_whole_history_each_turn() -> None:
    """Turn k's prompt is the shared prefix, every earlier user turn and answer, then its own
    new tokens; conversations run `concurrency` at a time, their turns in order."""
    async with fake_openai_server() as server:
        config = BenchConfig(
            base_url=server.url, model="m", num_requests=7, concurrency=2, turns=3,
            shared_prefix=20, prompt_tokens="fixed:5", output_tokens="fixed:4",
        )  # fmt: skip
        run = await run_benchmark(config)
    assert run.summary.requests_ok == 7 and len(server.bodies) == 7
    prompts = [body["prompt"] for body in server.bodies]
    assert [len(p) for p in prompts].count(25) == 3, "3 conversations (3 + 3 + 1 turns) start"
    firsts = [p for p in prompts if len(p) == 25]
    assert len({tuple(p[:20]) for p in firsts}) == 1, "every conversation shares the prefix"
    answer = [0, 1, 2, 3]  # the fake server's tokens
    seconds = [p for p in prompts if len(p) == 34]
    thirds = [p for p in prompts if len(p) == 43]
    assert len(seconds) == len(thirds) == 2, "two conversations of three turns, one of one"
    for second in seconds:
        assert second[:25] in firsts and second[25:29] == answer
        [third] = [t for t in thirds if t[:34] == second]
        assert third[34:38] == answer


def test_conversations_need_token_ids() -> None:
    with pytest.raises(ValueError, match="token-id prompts"):
        BenchConfig(base_url="x", num_requests=1, rate=1.0, turns=2, endpoint="chat")
    with pytest.raises(ValueError, match="return_token_ids"):
        BenchConfig(base_url="x", num_requests=1, rate=1.0, shared_prefix=8, vllm_extras=False)
