"""The shape of the served model: built-in entries and Hugging Face config.json files."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from services.planner.errors import PlannerError

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


class ModelSpec(BaseModel):
    """A dense Llama-family decoder (Llama, Qwen2, Mistral); MoE is not modelled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tie_embeddings: bool = False
    bytes_per_element: int = Field(2, gt=0, description="weights and KV cache")

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer's matrices (q, k, v, o, gate, up, down)."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        return attn + 3 * self.hidden_size * self.intermediate_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        heads = 1 if self.tie_embeddings else 2
        return self.num_layers * self.layer_params + heads * self.embedding_params

    @property
    def weight_bytes(self) -> int:
        return self.total_params * self.bytes_per_element

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token: 2 x layers x KV heads x head size x bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_element


def _spec(
    name: str, layers: int, hidden: int, heads: int, kv: int, inter: int, vocab: int
) -> ModelSpec:
    return ModelSpec(
        name=name,
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        intermediate_size=inter,
        vocab_size=vocab,
    )


# Figures from each model's published config.json.
BUILTIN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _spec("llama-3-8b", 32, 4096, 32, 8, 14336, 128256),
        _spec("llama-3-70b", 80, 8192, 64, 8, 28672, 128256),
        _spec("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064),
        _spec("qwen2.5-32b", 64, 5120, 40, 8, 27648, 152064),
        _spec("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064),
        _spec("mistral-7b", 32, 4096, 32, 8, 14336, 32768),
    )
}


def builtin_model(name: str) -> ModelSpec:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_MODELS))
        raise PlannerError(f"model: unknown model '{name}'; built-in models: {known}") from None


def model_from_hf_config(path: Path) -> ModelSpec:
    """Read a Hugging Face config.json (a file, or a directory holding one)."""
    file = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(file.read_text())
    except OSError as exc:
        raise PlannerError(f"model.config: cannot read {file}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise PlannerError(f"model.config: {file} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise PlannerError(f"model.config: {file} must hold a JSON object")
    if config.get("num_local_experts"):
        raise PlannerError(
            f"model.config: {file} is a mixture-of-experts model "
            f"(num_local_experts={config['num_local_experts']}); the planner models dense "
            "decoders only"
        )
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [key for key in (*required, "vocab_size") if key not in config]
    if missing:
        raise PlannerError(f"model.config: {file} lacks {', '.join(missing)}")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    if dtype not in _DTYPE_BYTES:
        raise PlannerError(
            f"model.config: {file} has dtype {dtype}; supported: {list(_DTYPE_BYTES)}"
        )
    heads = int(config["num_attention_heads"])
    try:
        return ModelSpec(
            name=str(config.get("_name_or_path") or file.parent.name or file.stem),
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=int(config["hidden_size"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            bytes_per_element=_DTYPE_BYTES[dtype],
        )
    except (TypeError, ValueError) as exc:
        raise PlannerError(
            f"model.config: {file} has a non-numeric or invalid field: {exc}"
        ) from None
