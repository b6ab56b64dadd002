"""SmolLM2-135M-Instruct (a real trained model) through the whole system, over real NATS and
HTTP with the official openai client. It has 3 KV heads, so tensor parallel 3 gives each rank
one. One float32 system: native prefill in vLLM's FLASH_ATTN layout (block 16) and at TP 3,
a real vLLM prefill with every field but the engine left to its default (block size 32, the
model's max_model_len 8192), native decode in the vllm-ascend layout (block 128) and at TP 3;
the converter bridges the layouts and merges or splits the shards. Tokens must equal
transformers' greedy tokens; the chat answer to "What is the capital of France?" says Paris.
vLLM decodes too (from native and from vLLM prefills) and prefills at TP 3. A bfloat16 system
(model and KV in bfloat16, native and vLLM prefill) answers the same and stays within
bfloat16's resolution of transformers (tests/test_real_model.py says why that is the
tolerance). A third system samples three more layouts (TensorRT-LLM prefill, Gaudi and SGLang
decode) and kills the decode instance serving a stream: it resumes on the other one with
transformers' tokens.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import openai
import pytest

from services.backends.vllm.engine_args import vllm_missing_reason
from services.bench.oracle import hf_greedy
from services.hf.tokenizer import Tokenizer
from tests.system import (
    BF16_MIN_ARGMAX_SHARE,
    BF16_TOLERANCE_ULPS,
    RunningSystem,
    bf16_gaps,
    hf_teacher_forced_logits,
    run_system,
)

pytestmark = pytest.mark.slow

NEEDS_VLLM = pytest.mark.skipif(
    vllm_missing_reason() is not None,
    reason=f"the vllm extra is not installed: {vllm_missing_reason()}",
)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
OTHER = [{"role": "user", "content": "Name a primary colour."}]
MAX_TOKENS = 10
SMALL_ASCEND = {"kv_layout": "ascend", "num_blocks": 8}  # 1024 tokens
FLASH_TP3 = {"tp": 3, "kv_layout": "vllm-flash", "num_blocks": 32}
VLLM_TP3 = {"engine": "vllm", "tp": 3, "max_model_len": 1024}


def if_vllm(*specs: dict) -> list[dict]:
    """vLLM instances, when vLLM is installed (else their tests skip)."""
    return list(specs) if vllm_missing_reason() is None else []


@pytest.fixture(scope="module")
def real_system(nats_server, smollm2, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    topology = {
        "model": str(smollm2["float32"]),
        "prefill": [
            {"name": "p-flash", "kv_layout": "vllm-flash", "num_blocks": 64},
            {"name": "p-tp3", **FLASH_TP3},
            # nothing but the engine set: every other field's default must do
            *if_vllm({"name": "p-vllm", "engine": "vllm"}, {"name": "p-vllm-tp3", **VLLM_TP3}),
        ],
        "decode": [
            {"name": "d-ascend", **SMALL_ASCEND},
            {"name": "d-tp3", **FLASH_TP3},
            *if_vllm({"name": "d-vllm", "engine": "vllm", "num_blocks": 64}),
        ],
        "converter": {"replicas": 1},
    }
    with run_system(
        topology, nats_server.url, tmp_path_factory.mktemp("real"), timeout_s=900
    ) as system:
        yield system


@pytest.fixture(scope="module")
def bf16_system(nats_server, smollm2, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    topology = {
        "model": str(smollm2["bfloat16"]),
        "prefill": [
            {"name": "p-flash", "dtype": "bfloat16", "num_blocks": 64},
            *if_vllm({"name": "p-vllm", "engine": "vllm", "dtype": "bfloat16"}),
        ],
        "decode": [{"name": "d-ascend", "dtype": "bfloat16", **SMALL_ASCEND}],
        "converter": {"replicas": 1},
    }
    with run_system(
        topology, nats_server.url, tmp_path_factory.mktemp("real-bf16"), timeout_s=600
    ) as system:
        yield system


@pytest.fixture(scope="module")
def failover_system(nats_server, smollm2, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    """Three more layouts (TensorRT-LLM, Gaudi, SGLang), two decode instances to fail over."""
    topology = {
        "model": str(smollm2["float32"]),
        "prefill": [{"name": "p-trt", "kv_layout": "tensorrt-llm", "num_blocks": 64}],
        "decode": [
            {"name": "d-gaudi", "kv_layout": "gaudi", "num_blocks": 8},
            {"name": "d-sglang", "kv_layout": "sglang", "num_blocks": 64},
        ],
        "converter": {"replicas": 1},
    }
    with run_system(
        topology, nats_server.url, tmp_path_factory.mktemp("real-failover"), timeout_s=300
    ) as system:
        yield system


def client_of(system: RunningSystem) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=system.base_url, api_key="unused", max_retries=0)


def chat_prompt(system: RunningSystem, messages: list[dict]) -> list[int]:
    tokenizer = Tokenizer.from_model_dir(system.model_dir)
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


def route(prefill: str, decode: str) -> dict:
    return {"prefill_instance": f"{prefill}-0", "decode_instance": f"{decode}-0"}


async def streamed_chat(system: RunningSystem, prefill: str, decode: str) -> str:
    stream = await client_of(system).chat.completions.create(
        model=system.model_dir.name,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,
        extra_body={"hetserve_route": route(prefill, decode)},
    )
    parts, finish = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"  # it ends with <|im_end|>, SmolLM2's EOS
    return "".join(parts)


async def greedy_ids(system: RunningSystem, prompt: list[int], prefill: str, decode: str) -> list:
    reply = await client_of(system).completions.create(
        model=system.model_dir.name,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={
            "return_token_ids": True,
            "ignore_eos": True,
            "hetserve_route": route(prefill, decode),
        },
    )
    return reply.choices[0].model_extra["token_ids"]


async def test_streamed_chat_says_paris_across_two_layouts(real_system: RunningSystem) -> None:
    answer = await streamed_chat(real_system, "p-flash", "d-ascend")
    assert "Paris" in answer, answer
    whole = await client_of(real_system).chat.completions.create(
        model=real_system.model_dir.name, messages=QUESTION, max_tokens=16, temperature=0
    )
    assert whole.choices[0].message.content == answer  # the scheduler's own pick agrees


PAIRS = [
    ("p-flash", "d-ascend"),  # vllm-flash@16 -> converter -> ascend@128
    ("p-tp3", "d-ascend"),  # the converter merges three shards
    ("p-flash", "d-tp3"),  # ... and splits the heads three ways
    ("p-tp3", "d-tp3"),  # identical descriptors: rank r -> rank r, no converter
]


@pytest.mark.parametrize(("prefill", "decode"), PAIRS, ids=[f"{p}->{d}" for p, d in PAIRS])
async def test_native_pairs_give_transformers_tokens(
    real_system: RunningSystem, prefill: str, decode: str
) -> None:
    prompt = chat_prompt(real_system, OTHER if "tp3" in prefill + decode else QUESTION)
    assert await greedy_ids(real_system, prompt, prefill, decode) == hf_greedy(
        real_system.model_dir, prompt, MAX_TOKENS
    )
    stats = await real_system.stats(f"{decode}-0")
    assert stats.free_blocks == stats.total_blocks


VLLM_PAIRS = [
    ("p-vllm", "d-ascend"),  # vllm-cpu@32 -> converter -> ascend@128
    ("p-vllm", "d-tp3"),  # ... split three ways for native TP 3
    ("p-vllm-tp3", "d-ascend"),  # each vLLM rank sends its KV head; the converter merges
    ("p-flash", "d-vllm"),  # native vllm-flash@16 -> converter -> vLLM decode
    ("p-vllm", "d-vllm"),  # identical descriptors, vLLM on both sides: direct
]


@NEEDS_VLLM
@pytest.mark.parametrize(
    ("prefill", "decode"), VLLM_PAIRS, ids=[f"{p}->{d}" for p, d in VLLM_PAIRS]
)
async def test_vllm_pairs_give_transformers_tokens(
    real_system: RunningSystem, prefill: str, decode: str
) -> None:
    prompt = chat_prompt(real_system, QUESTION)
    assert await greedy_ids(real_system, prompt, prefill, decode) == hf_greedy(
        real_system.model_dir, prompt, MAX_TOKENS
    )
    answer = await streamed_chat(real_system, prefill, decode)
    assert "Paris" in answer, answer


@NEEDS_VLLM
async def test_vllm_instances_got_working_defaults(real_system: RunningSystem) -> None:
    for instance, tp in (("p-vllm-0", 1), ("p-vllm-tp3-0", 3), ("d-vllm-0", 1)):
        stats = await real_system.stats(instance)
        assert (stats.kv.layout, stats.kv.block_size, stats.kv.tp_size) == ("vllm-cpu", 32, tp)
        assert stats.kv.num_kv_heads == 3


@pytest.mark.parametrize("prefill", ["p-flash", pytest.param("p-vllm", marks=NEEDS_VLLM)])
async def test_bfloat16_system_says_paris_within_bf16_resolution(
    bf16_system: RunningSystem, prefill: str
) -> None:
    answer = await streamed_chat(bf16_system, prefill, "d-ascend")
    assert "Paris" in answer, answer
    prompt = chat_prompt(bf16_system, QUESTION)
    out = await greedy_ids(bf16_system, prompt, prefill, "d-ascend")
    logits = hf_teacher_forced_logits(bf16_system.model_dir, "bfloat16", prompt, out)
    gaps = bf16_gaps(logits, out)
    assert (gaps <= BF16_TOLERANCE_ULPS).all(), gaps.tolist()
    assert (gaps == 0).float().mean() >= BF16_MIN_ARGMAX_SHARE
    for instance in (f"{prefill}-0", "d-ascend-0"):
        assert (await bf16_system.stats(instance)).kv.dtype == "bfloat16"


@pytest.mark.parametrize("decode", ["d-gaudi", "d-sglang"])
async def test_more_layouts_give_transformers_tokens(
    failover_system: RunningSystem, decode: str
) -> None:
    prompt = chat_prompt(failover_system, QUESTION)
    assert await greedy_ids(failover_system, prompt, "p-trt", decode) == hf_greedy(
        failover_system.model_dir, prompt, MAX_TOKENS
    )


async def test_killed_decode_resumes_elsewhere_with_the_same_tokens(
    failover_system: RunningSystem,
) -> None:
    prompt = chat_prompt(failover_system, OTHER)
    n = 40
    stream = await client_of(failover_system).completions.create(
        model=failover_system.model_dir.name,
        prompt=prompt,
        max_tokens=n,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    tokens: list[int] = []
    killed = None
    async for chunk in stream:
        for choice in chunk.choices:
            tokens.extend(choice.model_extra.get("token_ids") or [])
        if killed is None and len(tokens) >= 8:
            stats = {d: await failover_system.stats(f"{d}-0") for d in ("d-gaudi", "d-sglang")}
            (killed,) = [d for d, info in stats.items() if info.running > 0]
            os.kill(stats[killed].pid, signal.SIGKILL)
    assert killed is not None
    assert tokens == hf_greedy(failover_system.model_dir, prompt, n)
    survivor = next(d for d in ("d-gaudi", "d-sglang") if d != killed)
    after = await failover_system.stats(f"{survivor}-0")
    assert after.free_blocks == after.total_blocks
