"""The native engine against Hugging Face transformers on the same weights: every registered
KV layout as its cache, three architectures, batched decode with requests joining and leaving,
and sampling and stopping rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from proto.layout_registry import LAYOUTS
from proto.messages import GenerateRequest, SamplingParams
from services.bench.oracle import hf_greedy
from services.engine.engine import NativeEngine
from tests.engine_loop import generate_batched
from tests.system import make_model

PROMPTS = [[5, 77, 300, 12, 9, 401, 33, 900, 17] * 3, [50], list(range(100, 290))]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engine-models")
    return {
        "mistral": make_model(root / "mistral", arch="mistral"),
        "llama3-rope": make_model(root / "llama3", arch="llama", rope_scaling="llama3", seed=1),
    }


def engine_for(model: Path, layout: str, blocks: int = 64) -> NativeEngine:
    spec = LAYOUTS[layout]
    block = 16 if 16 in spec.block_sizes else spec.block_sizes[0]
    return NativeEngine(model, layout, block, "float32", blocks, "cpu")


def greedy_request(i: int, prompt: list[int], n: int, **sampling: object) -> GenerateRequest:
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **sampling)
    return GenerateRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling=params)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_as_cache_gives_transformers_tokens(tiny_llama: Path, layout: str) -> None:
    engine = engine_for(tiny_llama, layout)
    requests = [greedy_request(i, p, 24) for i, p in enumerate(PROMPTS)]
    got = generate_batched(engine, requests, join_every=3)
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        assert tokens == hf_greedy(tiny_llama, prompt, 24)
    assert engine.blocks.num_free == engine.blocks.num_total


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "llama3-rope"])
def test_architectures_match_transformers(arch: str, tiny_qwen2: Path, models: dict) -> None:
    model = tiny_qwen2 if arch == "qwen2" else models[arch]
    engine = engine_for(model, "vllm-flash")
    requests = [greedy_request(i, p, 32) for i, p in enumerate(PROMPTS)]
    for prompt, tokens in zip(PROMPTS, generate_batched(engine, requests), strict=True):
        assert tokens == hf_greedy(model, prompt, 32)


def test_prefill_logits_match_transformers(tiny_qwen2: Path) -> None:
    from transformers import AutoModelForCausalLM

    engine = engine_for(tiny_qwen2, "ascend")
    prompt = PROMPTS[2]
    seq = engine.new_sequence(greedy_request(0, prompt, 1))
    seq.block_table = engine.blocks.allocate(engine.blocks_for(len(prompt)))
    captured = {}
    original = engine.model.lm_head.forward
    engine.model.lm_head.forward = lambda x: captured.setdefault("logits", original(x))
    engine.prefill(seq)
    hf = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    with torch.inference_mode():
        want = hf(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(captured["logits"][0], want, rtol=1e-4, atol=1e-4)


def test_batch_joins_and_leaves_without_changing_tokens(tiny_llama: Path) -> None:
    engine = engine_for(tiny_llama, "vllm-flash")
    requests = [
        greedy_request(i, p, n)
        for i, (p, n) in enumerate(zip(PROMPTS * 2, [5, 30, 12, 20, 8, 16], strict=True))
    ]
    together = generate_batched(engine, requests, join_every=2)
    alone = [generate_batched(engine, [r])[0] for r in requests]
    assert together == alone


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_llama: Path) -> None:
    engine = engine_for(tiny_llama, "vllm-flash")
    prompt = PROMPTS[0]

    def run(**sampling: object) -> list[int]:
        params = SamplingParams(max_tokens=20, ignore_eos=True, **sampling)
        return generate_batched(
            engine, [GenerateRequest(request_id="s", prompt_token_ids=prompt, sampling=params)]
        )[0]

    first = run(temperature=1.0, top_p=0.9, top_k=50, seed=123)
    assert first == run(temperature=1.0, top_p=0.9, top_k=50, seed=123)
    assert first != run(temperature=1.0, top_p=0.9, top_k=50, seed=124)
    assert run(temperature=0.8, top_k=1, seed=5) == hf_greedy(tiny_llama, prompt, 20)


def test_stop_token_ids_stop_strings_and_eos(tiny_llama: Path) -> None:
    engine = engine_for(tiny_llama, "vllm-flash")
    prompt = PROMPTS[1]
    reference = hf_greedy(tiny_llama, prompt, 30)
    stop_id = reference[6]
    [tokens] = generate_batched(engine, [greedy_request(0, prompt, 30, stop_token_ids=[stop_id])])
    assert tokens == reference[: reference.index(stop_id) + 1]
    text = engine.tokenizer.decode(reference[:10])
    stop = text[-3:]
    seq = engine.new_sequence(greedy_request(1, prompt, 30, stop=[stop]))
    seq.block_table = engine.blocks.allocate(engine.blocks_for(len(prompt) + 30))
    engine.prefill(seq)
    while not seq.finished:
        engine.decode([seq])
    assert seq.finish_reason == "stop" and seq.stop_reason == stop
    assert stop in engine.tokenizer.decode(seq.output_ids)
    assert len(seq.output_ids) <= 10
    eos = engine.cfg.eos_token_ids[0]
    params = SamplingParams(max_tokens=5, temperature=0)
    seq = engine.new_sequence(
        GenerateRequest(request_id="e", prompt_token_ids=prompt, sampling=params)
    )
    assert seq.stopper.check(eos, 1) == ("stop", None)
    assert seq.stopper.check(eos + 1, 5) == ("length", None)
