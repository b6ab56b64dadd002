"""KV reuse through the whole system, with the official client and transformers as the oracle:
prefix caching at the prefill instance (usage.prompt_tokens_details.cached_tokens), a later
turn of a conversation that moves only the KV its decode instance lacks, short prompts
prefilled where they decode, and aggregated (`both`) instances with no prefill instance."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from openai import OpenAI

from services.bench.oracle import hf_greedy
from tests.system import run_system

pytestmark = pytest.mark.slow

FIRST = [(7 * i) % 900 + 20 for i in range(1500)]


def topology(model: Path) -> dict:
    return {
        "model": str(model),
        "prefill": [
            {"name": "p-flash", "kv_layout": "vllm-flash", "block_size": 16, "num_blocks": 512}
        ],
        "decode": [
            {
                "name": "d-ascend",
                "kv_layout": "ascend",
                "block_size": 128,
                "num_blocks": 64,
                "prefill_locally_below": 16,
            }
        ],
        "converter": {"replicas": 1},
    }


@pytest.fixture(scope="module")
def system(nats_server, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN001, ANN201
    with run_system(
        topology(tiny_llama), nats_server.url, tmp_path_factory.mktemp("reuse")
    ) as running:
        yield running


def complete(system, prompt: list[int], n: int = 8) -> tuple[list[int], int]:  # noqa: ANN001
    client = OpenAI(base_url=system.base_url, api_key="unused")
    done = client.completions.create(
        model="tiny-llama", prompt=prompt, max_tokens=n, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )  # fmt: skip
    details = done.usage.prompt_tokens_details
    return done.choices[0].model_extra["token_ids"], details.cached_tokens if details else 0


async def test_a_repeated_prompt_is_served_from_the_prefix_cache(system, tiny_llama: Path) -> None:  # noqa: ANN001
    tokens, cached = complete(system, FIRST)
    assert tokens == hf_greedy(tiny_llama, FIRST, 8)
    again, cached_again = complete(system, FIRST)
    assert again == tokens
    assert cached_again >= 1024, f"the second time {cached_again} of 1500 tokens were cached"
    shared = FIRST[:1350] + [(3 * i) % 500 + 11 for i in range(150)]  # 90% in common
    tokens, cached = complete(system, shared)
    assert tokens == hf_greedy(tiny_llama, shared, 8)
    assert cached == 1344, "every full 16-token block of the shared 1350 tokens"


async def test_a_later_turn_moves_only_the_kv_the_decode_lacks(system, tiny_llama: Path) -> None:  # noqa: ANN001
    turn1 = [(5 * i) % 700 + 40 for i in range(700)]
    answer, _ = complete(system, turn1, 16)
    before = (await system.stats("d-ascend-0")).kv_loaded_tokens
    turn2 = turn1 + answer + [(11 * i) % 300 + 9 for i in range(60)]
    tokens, _ = complete(system, turn2)
    assert tokens == hf_greedy(tiny_llama, turn2, 8)
    moved = (await system.stats("d-ascend-0")).kv_loaded_tokens - before
    # the decode kept turn 1's prompt and answer: 715 computed tokens, 5 whole 128-blocks
    assert moved == len(turn2) - 640, f"{moved} of {len(turn2)} context tokens were moved"


async def test_short_prompts_are_prefilled_where_they_decode(system, tiny_llama: Path) -> None:  # noqa: ANN001
    before = (await system.stats("d-ascend-0")).kv_loaded_tokens
    short = [50, 60, 70, 80, 90, 100]
    tokens, _ = complete(system, short, 12)
    assert tokens == hf_greedy(tiny_llama, short, 12)
    after_short = (await system.stats("d-ascend-0")).kv_loaded_tokens
    assert after_short == before, "a 6-token prompt moved no KV: the decode prefilled it"
    long = list(range(100, 140))
    assert complete(system, long)[0] == hf_greedy(tiny_llama, long, 8)
    assert (await system.stats("d-ascend-0")).kv_loaded_tokens > after_short


def test_aggregated_instances_need_no_prefill_instance(
    nats_server, tiny_llama: Path, tmp_path
) -> None:  # noqa: ANN001
    both = {
        "model": str(tiny_llama),
        "both": [
            {"name": "agg-flash", "kv_layout": "vllm-flash", "block_size": 16, "num_blocks": 128},
            {"name": "agg-ascend", "kv_layout": "ascend", "block_size": 128, "num_blocks": 16},
        ],
        "converter": {"replicas": 0},
    }
    with run_system(both, nats_server.url, tmp_path) as running:
        client = OpenAI(base_url=running.base_url, api_key="unused")
        for prompt in ([5, 6, 7], FIRST[:300]):
            done = client.completions.create(
                model="tiny-llama", prompt=prompt, max_tokens=10, temperature=0,
                extra_body={"return_token_ids": True, "ignore_eos": True},
            )  # fmt: skip
            assert done.choices[0].model_extra["token_ids"] == hf_greedy(tiny_llama, prompt, 10)
        for name in ("agg-flash-0", "agg-ascend-0"):
            stats = asyncio.run(running.stats(name))
            assert stats.kv_loaded_tokens == 0 and stats.free_blocks == stats.total_blocks
