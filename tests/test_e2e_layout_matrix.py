"""Every registered layout on both sides of a disaggregated pair, over real NATS and HTTP.

One system runs a prefill and a decode instance per layout (each at a block size of its own);
requests pin a (prefill, decode) pair with the `hetserve_route` extension, so a ring of pairs
puts every layout on each side at least once, block sizes change across most pairs, and one
pair of identical descriptors goes direct (no converter). In float32 the tokens must be
identical to Hugging Face transformers' greedy output."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from proto.layout_registry import LAYOUTS
from services.bench.oracle import hf_greedy
from tests.system import RunningSystem, run_system

pytestmark = pytest.mark.slow

NAMES = sorted(LAYOUTS)


def block_size(layout: str, side: str) -> int:
    """Prefill takes each layout's smallest block >= 16, decode its largest: sizes differ."""
    sizes = [b for b in LAYOUTS[layout].block_sizes if b >= 16] or list(LAYOUTS[layout].block_sizes)
    return min(sizes) if side == "prefill" else max(sizes)


def instance(layout: str, side: str) -> dict:
    return {
        "name": f"{side[0]}-{layout}",
        "kv_layout": layout,
        "block_size": block_size(layout, side),
        "num_blocks": 64,
        "dtype": "float32",
    }


PAIRS = [(NAMES[i], NAMES[(i + 1) % len(NAMES)]) for i in range(len(NAMES))]
PAIRS.append(("vllm-flash", "vllm-flash"))  # identical descriptors: sent direct


@pytest.fixture(scope="module")
def matrix(nats_server, tiny_llama: Path, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    topology = {
        "model": str(tiny_llama),
        "prefill": [instance(name, "prefill") for name in NAMES],
        "decode": [instance(name, "decode") for name in NAMES]
        + [{**instance("vllm-flash", "prefill"), "name": "d-vllm-flash-same"}],
        "converter": {"replicas": 1},
    }
    with run_system(
        topology, nats_server.url, tmp_path_factory.mktemp("matrix"), timeout_s=400
    ) as system:
        yield system


def test_pairs_cover_every_layout_on_both_sides() -> None:
    assert {p for p, _ in PAIRS} == set(NAMES) == {d for _, d in PAIRS}
    assert len(PAIRS) >= 12


@pytest.mark.parametrize(("prefill", "decode"), PAIRS, ids=[f"{p}->{d}" for p, d in PAIRS])
async def test_pair_gives_transformers_tokens(
    matrix: RunningSystem, prefill: str, decode: str
) -> None:
    client = openai.AsyncOpenAI(base_url=matrix.base_url, api_key="unused", max_retries=0)
    decode_id = "d-vllm-flash-same-0" if prefill == decode else f"d-{decode}-0"
    prompt = [random.Random(prefill + decode).randrange(5, 1000) for _ in range(150)]
    reply = await client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=16,
        temperature=0,
        extra_body={
            "return_token_ids": True,
            "ignore_eos": True,
            "hetserve_route": {"prefill_instance": f"p-{prefill}-0", "decode_instance": decode_id},
        },
    )
    assert reply.choices[0].model_extra["token_ids"] == hf_greedy(matrix.model_dir, prompt, 16)
    stats = await matrix.stats(decode_id)
    assert stats.kv.layout == decode and stats.free_blocks == stats.total_blocks
