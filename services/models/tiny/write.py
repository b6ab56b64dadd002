"""The Hugging Face directory of a tiny model: config, generation config, tokenizer, weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from services.models.tiny.archs import ARCHS, IM_END, LLAMA3_ROPE_SCALING, ArchSpec, TokenizerSpec
from services.models.tiny.tokenizer import train_tokenizer
from services.models.tiny.weights import init_weights

# Files this script writes; --force removes exactly these (never the whole directory).
OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def model_config(
    spec: ArchSpec, vocab: int, tok: Tokenizer, rope_scaling: dict[str, Any] | None, dtype: str
) -> dict[str, Any]:
    bos = spec.tokenizer.bos
    config: dict[str, Any] = {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "vocab_size": vocab,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": spec.tied,
        "use_cache": True,
        "bos_token_id": tok.token_to_id(bos) if bos else None,
        "eos_token_id": tok.token_to_id(spec.tokenizer.model_eos),
        "torch_dtype": dtype,
    }
    if spec.write_head_dim:
        config["head_dim"] = spec.head_dim
    config.update(spec.extra_config)
    return config


def generation_config(spec: TokenizerSpec, tok: Tokenizer) -> dict[str, Any]:
    eos = dict.fromkeys([spec.model_eos, spec.eos, IM_END])
    config: dict[str, Any] = {"eos_token_id": [tok.token_to_id(t) for t in eos]}
    if spec.bos:
        config["bos_token_id"] = tok.token_to_id(spec.bos)
    return config


def tokenizer_config(spec: TokenizerSpec, tok: Tokenizer, max_positions: int) -> dict[str, Any]:
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    added = {
        str(tok.token_to_id(t)): {"content": t, **flags, "special": True}
        for t in spec.special_tokens
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": spec.bos,
        "eos_token": spec.eos,
        "pad_token": spec.pad,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_positions,
        "tokenizer_class": spec.tokenizer_class,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    seed: int = 0,
    chat_template_in: str = "jinja",
    rope_scaling: str | None = None,
    dtype: str = "float32",
    force: bool = False,
) -> Path:
    """Write the model into `out_dir` and return its path.

    chat_template_in: "jinja" writes chat_template.jinja (transformers >= 4.50);
    "tokenizer_config" puts it under tokenizer_config.json's "chat_template" (older layout).
    rope_scaling: None or "llama3".
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    if chat_template_in not in ("jinja", "tokenizer_config"):
        raise ValueError(
            f"chat_template_in must be 'jinja' or 'tokenizer_config', not {chat_template_in!r}"
        )
    if rope_scaling not in (None, "llama3"):
        raise ValueError(f"rope_scaling must be None or 'llama3', not {rope_scaling!r}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype!r}")
    spec = ARCHS[arch]
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass force=True (--force) to overwrite")
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(spec.tokenizer)
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    vocab = -(-n_tokens // spec.vocab_multiple) * spec.vocab_multiple
    tok.save(str(out / "tokenizer.json"))

    scaling = dict(LLAMA3_ROPE_SCALING) if rope_scaling == "llama3" else None
    _write_json(out / "config.json", model_config(spec, vocab, tok, scaling, dtype))
    _write_json(out / "generation_config.json", generation_config(spec.tokenizer, tok))
    tok_config = tokenizer_config(spec.tokenizer, tok, spec.max_positions)
    if chat_template_in == "jinja":
        (out / "chat_template.jinja").write_text(spec.chat_template, encoding="utf-8")
    else:
        tok_config["chat_template"] = spec.chat_template
    _write_json(out / "tokenizer_config.json", tok_config)

    weights = init_weights(spec, vocab, seed)
    target = getattr(torch, dtype)
    weights = {name: t.to(target).contiguous() for name, t in weights.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; containers read it
    return out
