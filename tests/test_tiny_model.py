"""scripts/make_tiny_model.py and services/hf/config.py, checked against transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # the oracle (a test dependency)
from safetensors import safe_open

from services.hf.config import load_model_config, parse_model_config
from services.models import tiny
from services.models.tiny import archs
from services.models.tiny import cli as tiny_cli

ROOT = Path(__file__).resolve().parents[1]


# (arch, chat template placement, rope scaling)
VARIANTS = [
    ("llama", "jinja", None),
    ("llama", "tokenizer_config", "llama3"),
    ("qwen2", "jinja", None),
    ("qwen2", "tokenizer_config", None),
    ("mistral", "jinja", None),
    ("mistral", "tokenizer_config", None),
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        v: tiny.make_tiny_model(root / "-".join(map(str, v)), v[0], 0, v[1], v[2]) for v in VARIANTS
    }


def expected_weight_names(spec) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not spec.tied:
        names.add("lm_head.weight")
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {f"{p}self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        if spec.qkv_bias:
            names |= {f"{p}self_attn.{x}_proj.bias" for x in "qkv"}
    return names


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path) -> None:
    a = tiny.make_tiny_model(tmp_path / "a", "qwen2", seed=3)
    b = tiny.make_tiny_model(tmp_path / "b", "qwen2", seed=3)
    c = tiny.make_tiny_model(tmp_path / "c", "qwen2", seed=4)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tiny.make_tiny_model(tmp_path / "m", "llama", chat_template_in="jinja")
    with pytest.raises(FileExistsError):
        tiny.make_tiny_model(out, "llama")
    assert tiny_cli.main([str(out), "--chat-template-in", "tokenizer_config"]) == 2

    (out / "notes.txt").write_text("mine")
    code = tiny_cli.main([str(out), "--chat-template-in", "tokenizer_config", "--force"])
    assert code == 0
    # The stale chat_template.jinja would otherwise take precedence over tokenizer_config's.
    assert not (out / "chat_template.jinja").exists()
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "notes.txt").read_text() == "mine"


def test_rejects_unknown_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown arch"):
        tiny.make_tiny_model(tmp_path / "x", "gpt2")
    with pytest.raises(ValueError, match="chat_template_in"):
        tiny.make_tiny_model(tmp_path / "x", "llama", chat_template_in="yaml")


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_transformers_loads_and_generates(model_dirs: dict[tuple, Path], variant: tuple) -> None:
    arch, placement, rope = variant
    path, spec = model_dirs[variant], tiny.ARCHS[arch]
    assert (path / "chat_template.jinja").exists() == (placement == "jinja")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected_weight_names(spec)

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == spec.architecture
    assert tok.chat_template is not None
    assert model.config.tie_word_embeddings == spec.tied
    if rope == "llama3":
        assert model.config.rope_parameters["rope_type"] == "llama3"

    chat = [{"role": "user", "content": "Hello, robot!"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    out = model.generate(
        ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids)
    )
    assert out.shape == (1, ids.shape[1] + 8)
    assert isinstance(tok.decode(out[0, ids.shape[1] :]), str)


@pytest.mark.parametrize("arch", sorted(tiny.ARCHS))
def test_random_model_has_clear_argmax_and_uses_context(
    model_dirs: dict[tuple, Path], arch: str
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[(arch, "jinja", None)])
    ids = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
        changed = ids.clone()
        changed[:, 0] = (changed[:, 0] + 1) % 1000
        other = model(changed).logits
    top2 = logits.topk(2, dim=-1).values
    gaps = (top2[..., 0] - top2[..., 1]).flatten()
    # Greedy decoding must not hinge on float rounding differences between engines.
    assert (gaps > 1e-3).float().mean() > 0.99
    # Attention matters: changing the first token moves the last position's logits.
    assert (other[:, -1] - logits[:, -1]).abs().max(-1).values.min() > 0.1
    assert (other[:, 1:].argmax(-1) != logits[:, 1:].argmax(-1)).float().mean() > 0.1


def test_llama3_rope_scaling_changes_the_output(model_dirs: dict[tuple, Path]) -> None:
    plain = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[VARIANTS[0]])
    scaled = transformers.AutoModelForCausalLM.from_pretrained(model_dirs[VARIANTS[1]])
    ids = torch.arange(100, 164).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, scaled(ids).logits, atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_model_config_matches_the_spec(model_dirs: dict[tuple, Path], variant: tuple) -> None:
    arch, _, rope = variant
    spec = tiny.ARCHS[arch]
    cfg = load_model_config(model_dirs[variant])
    tok = json.loads((model_dirs[variant] / "tokenizer.json").read_text())
    n_tokens = len(tok["model"]["vocab"]) + len(tok["added_tokens"])
    assert cfg.model_type == arch
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        spec.hidden,
        spec.layers,
        spec.heads,
        spec.kv_heads,
        spec.head_dim,
    )
    assert cfg.vocab_size >= n_tokens and cfg.vocab_size % spec.vocab_multiple == 0
    assert (cfg.tie_word_embeddings, cfg.attention_bias) == (spec.tied, spec.qkv_bias)
    assert cfg.rope_theta == spec.rope_theta
    assert cfg.sliding_window is None
    assert cfg.torch_dtype == "float32"
    assert cfg.rope_scaling == (archs.LLAMA3_ROPE_SCALING if rope else None)
    im_end = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|im_end|>")
    assert im_end in cfg.eos_token_ids  # only generation_config.json names it


@pytest.mark.parametrize("variant", [VARIANTS[1], VARIANTS[3], VARIANTS[4]], ids=str)
def test_config_written_by_transformers_5_parses_the_same(
    model_dirs: dict[tuple, Path], variant: tuple, tmp_path: Path
) -> None:
    """transformers 5 rewrites config.json with "dtype" and "rope_parameters"."""
    src = model_dirs[variant]
    hf_config = transformers.AutoConfig.from_pretrained(src)
    hf_config.save_pretrained(tmp_path)
    shutil.copy(src / "generation_config.json", tmp_path)
    assert load_model_config(tmp_path) == load_model_config(src)
    cfg = load_model_config(src)
    heads = hf_config.num_attention_heads
    assert cfg.head_dim == (getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads)
    assert cfg.num_kv_heads == hf_config.num_key_value_heads


def base_config(**overrides) -> dict:
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
        "eos_token_id": 2,
    }
    return raw | overrides


def test_parse_variants_of_rope_dtype_and_eos() -> None:
    cfg = parse_model_config(base_config())
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) == (4, 16, 1e4, None)
    assert cfg.torch_dtype == "float32" and cfg.bos_token_id is None

    legacy = parse_model_config(
        base_config(rope_scaling={"type": "linear", "factor": 2.0}, torch_dtype="bfloat16")
    )
    assert legacy.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert legacy.torch_dtype == "bfloat16"

    v5 = parse_model_config(
        base_config(
            dtype="float16",
            rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0},
        ),
        generation={"eos_token_id": [3, 2]},
    )
    assert v5.rope_theta == 5e5 and v5.rope_scaling == {"rope_type": "llama3", "factor": 8.0}
    assert v5.torch_dtype == "float16"
    assert v5.eos_token_ids == [2, 3]

    default_v5 = parse_model_config(
        base_config(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    )
    assert default_v5.rope_theta == 1e6 and default_v5.rope_scaling is None

    qwen = parse_model_config(
        base_config(architectures=["Qwen2ForCausalLM"], sliding_window=32, use_sliding_window=True)
    )
    assert qwen.attention_bias and qwen.sliding_window == 32
    mistral = parse_model_config(
        base_config(architectures=["MistralForCausalLM"], sliding_window=8)
    )
    assert mistral.sliding_window == 8 and not mistral.attention_bias


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "not supported"),
        ({"architectures": []}, "not supported"),
        ({"num_key_value_heads": 3}, "do not split"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"torch_dtype": "int8"}, "dtype"),
        ({"eos_token_id": "</s>"}, "token id"),
    ],
)
def test_parse_rejects(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_model_config(base_config(**overrides))


def test_load_rejects_missing_or_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model_config(tmp_path)
    raw = base_config()
    del raw["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="hidden_size"):
        load_model_config(tmp_path)
