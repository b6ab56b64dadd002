"""A decode instance short of KV blocks preempts its newest sequences instead of failing:
they are resumed (recomputed from their tokens so far) and still give transformers' tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from services.bench.oracle import hf_greedy
from tests.system import RunningSystem, run_system

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_decode(nats_server, tiny_llama: Path, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    topology = {
        "model": str(tiny_llama),
        "prefill": [{"name": "p", "kv_layout": "vllm-flash", "block_size": 16}],
        # 24 blocks of 16 tokens; each request below needs 9 blocks by its end
        "decode": [
            {
                "name": "d",
                "kv_layout": "vllm-flash",
                "block_size": 16,
                "num_blocks": 24,
                "env": {"HETSERVE_RESERVE_AHEAD_TOKENS": "16"},
            }
        ],
        "converter": {"replicas": 1},
    }
    with run_system(topology, nats_server.url, tmp_path_factory.mktemp("preempt")) as system:
        yield system


async def test_out_of_blocks_preempts_and_resumes(small_decode: RunningSystem) -> None:
    client = openai.AsyncOpenAI(base_url=small_decode.base_url, api_key="unused", max_retries=0)
    prompts = [[7 + i] + list(range(100 + 10 * i, 139 + 10 * i)) for i in range(4)]

    async def one(prompt: list[int]) -> list[int]:
        reply = await client.completions.create(
            model="tiny-llama",
            prompt=prompt,
            max_tokens=100,
            temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        return reply.choices[0].model_extra["token_ids"]

    results = await asyncio.gather(*(one(p) for p in prompts))
    for prompt, got in zip(prompts, results, strict=True):
        assert got == hf_greedy(small_decode.model_dir, prompt, 100)
    stats = await small_decode.stats("d-0")
    assert stats.preemptions > 0, stats
    assert stats.free_blocks == stats.total_blocks
