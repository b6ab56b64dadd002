"""Tensor-parallel instances end to end: each rank its own process (gloo), holding its shard
of heads and of the KV cache and sending its own frames. The tiny Llama has 2 KV heads, so
decode at TP 4 replicates them. Pairs (prefill TP, decode TP) = (1,1), (2,1), (1,2), (2,4)
through the converter, which merges and re-splits shards, and (2,2) with identical
descriptors, sent rank to rank without it. Tokens must equal transformers'."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from services.bench.oracle import hf_greedy
from tests.system import RunningSystem, run_system

pytestmark = pytest.mark.slow

FLASH = {"kv_layout": "vllm-flash", "block_size": 16, "num_blocks": 64}
PAIRS = [
    ("p-tp1", "d-tp1"),
    ("p-tp2", "d-tp1"),
    ("p-tp1", "d-tp2"),
    ("p-tp2", "d-tp4"),
    ("p-tp2", "d-tp2"),
]


@pytest.fixture(scope="module")
def tp_system(nats_server, tiny_llama: Path, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    topology = {
        "model": str(tiny_llama),
        "prefill": [{"name": "p-tp1", **FLASH}, {"name": "p-tp2", "tp": 2, **FLASH}],
        "decode": [
            {"name": "d-tp1", "kv_layout": "ascend", "block_size": 128, "num_blocks": 16},
            {"name": "d-tp2", "tp": 2, **FLASH},
            {
                "name": "d-tp4",
                "tp": 4,
                "kv_layout": "vllm-flash-hnd",
                "block_size": 32,
                "num_blocks": 32,
            },
        ],
        "converter": {"replicas": 1},
    }
    with run_system(
        topology, nats_server.url, tmp_path_factory.mktemp("tp"), timeout_s=400
    ) as system:
        yield system


@pytest.mark.parametrize(("prefill", "decode"), PAIRS, ids=[f"{p}->{d}" for p, d in PAIRS])
async def test_tp_pair_gives_transformers_tokens(
    tp_system: RunningSystem, prefill: str, decode: str
) -> None:
    client = openai.AsyncOpenAI(base_url=tp_system.base_url, api_key="unused", max_retries=0)
    prompt = [random.Random(prefill + decode).randrange(5, 1000) for _ in range(70)]
    reply = await client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        extra_body={
            "return_token_ids": True,
            "ignore_eos": True,
            "hetserve_route": {
                "prefill_instance": f"{prefill}-0",
                "decode_instance": f"{decode}-0",
            },
        },
    )
    assert reply.choices[0].model_extra["token_ids"] == hf_greedy(tp_system.model_dir, prompt, 24)
    stats = await tp_system.stats(f"{decode}-0")
    assert stats.kv.tp_size == int(decode[-1])
    assert stats.free_blocks == stats.total_blocks
