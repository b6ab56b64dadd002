"""A differently shaped model (Qwen2-style: q/k/v biases, tied embeddings, 3 layers, 6 heads)
through the converter the other way round: prefill stores vllm-ascend's separate K/V at block
128, decode vLLM FLASH_ATTN's HND order at block 32. Tokens must equal transformers'."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from services.bench.oracle import hf_greedy
from tests.system import RunningSystem, run_system

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qwen2_system(nats_server, tiny_qwen2: Path, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    topology = {
        "model": str(tiny_qwen2),
        "prefill": [{"name": "p-ascend", "kv_layout": "ascend", "block_size": 128}],
        "decode": [{"name": "d-hnd", "kv_layout": "vllm-flash-hnd", "block_size": 32}],
        "converter": {"replicas": 1},
    }
    with run_system(topology, nats_server.url, tmp_path_factory.mktemp("qwen2")) as system:
        yield system


async def test_qwen2_greedy_tokens_equal_transformers(qwen2_system: RunningSystem) -> None:
    client = openai.AsyncOpenAI(base_url=qwen2_system.base_url, api_key="unused", max_retries=0)
    rng = random.Random(3)
    for length in (2, 33, 129, 260):
        prompt = [rng.randrange(0, 1000) for _ in range(length)]
        reply = await client.completions.create(
            model="tiny-qwen2",
            prompt=prompt,
            max_tokens=32,
            temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        got = reply.choices[0].model_extra["token_ids"]
        assert got == hf_greedy(qwen2_system.model_dir, prompt, 32), f"prompt of {length} tokens"


async def test_qwen2_chat_streamed_equals_transformers(qwen2_system: RunningSystem) -> None:
    client = openai.AsyncOpenAI(base_url=qwen2_system.base_url, api_key="unused", max_retries=0)
    stream = await client.chat.completions.create(
        model="tiny-qwen2",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=32,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    chunks = [chunk async for chunk in stream]
    prompt_ids = chunks[0].model_extra["prompt_token_ids"]
    got = [t for c in chunks for ch in c.choices for t in (ch.model_extra.get("token_ids") or [])]
    assert got == hf_greedy(qwen2_system.model_dir, prompt_ids, 32)
