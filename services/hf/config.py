"""The model shape the native engine needs, read from a Hugging Face config.json.

Accepts what transformers 4.x writes ("torch_dtype", "rope_theta" + "rope_scaling" with a
"type" or "rope_type" key) and what 5.x writes ("dtype", "rope_parameters").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# architecture -> model_type; the engine's model code covers exactly these.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
_DTYPES = {"float32", "float16", "bfloat16"}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain RoPE; otherwise HF's dict, always with a "rope_type" key.
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    # None when attention is not windowed (Qwen2 writes a window but disables it).
    sliding_window: int | None
    eos_token_ids: list[int]
    bos_token_id: int | None
    torch_dtype: str

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_optional_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def token_id_list(value: Any) -> list[int]:
    """An eos_token_id field (absent, one id or a list) as a list of ids."""
    if value is None:
        return []
    if isinstance(value, bool) or not isinstance(value, int | list):
        raise ValueError(f"a token id must be an int or a list of ints, not {value!r}")
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"a token id must be an int or a list of ints, not {value!r}")
    return ids


def merge_ids(*lists: list[int]) -> list[int]:
    """Concatenation without duplicates, first occurrence wins."""
    return list(dict.fromkeys(i for ids in lists for i in ids))


def _dtype(raw: dict[str, Any]) -> str:
    value = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {value!r}; expected one of {sorted(_DTYPES)}")
    return name


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind == "default":
        return theta, None
    return theta, {"rope_type": kind, **params}


def _sliding_window(raw: dict[str, Any], model_type: str) -> int | None:
    window = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        return None
    return int(window) if window is not None else None


def _required(raw: dict[str, Any], key: str, path: Path) -> Any:
    if key not in raw:
        raise ValueError(f"{path} has no {key!r}")
    return raw[key]


def parse_model_config(
    raw: dict[str, Any],
    generation: dict[str, Any] | None = None,
    source: Path = Path("config.json"),
) -> ModelConfig:
    """Parse config.json's object; `generation` is generation_config.json's, for its eos ids."""
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"{source}: architectures {archs} are not supported; "
            f"the native engine runs {sorted(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = SUPPORTED_ARCHITECTURES[arch]
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (silu is)")
    if raw.get("mlp_bias", False):
        raise ValueError(f"{source}: mlp_bias is not supported")

    hidden = int(_required(raw, "hidden_size", source))
    heads = int(_required(raw, "num_attention_heads", source))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ValueError(f"{source}: {heads} attention heads do not split into {kv_heads} KV heads")
    head_dim = raw.get("head_dim") or hidden // heads
    bos = raw.get("bos_token_id")
    rope_theta, rope_scaling = _rope(raw)
    eos = merge_ids(
        token_id_list(raw.get("eos_token_id")),
        token_id_list((generation or {}).get("eos_token_id")),
    )
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(_required(raw, "vocab_size", source)),
        hidden_size=hidden,
        num_layers=int(_required(raw, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        intermediate_size=int(_required(raw, "intermediate_size", source)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        sliding_window=_sliding_window(raw, model_type),
        eos_token_ids=eos,
        bos_token_id=int(bos) if bos is not None else None,
        torch_dtype=_dtype(raw),
    )


def load_model_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model directory: no config.json")
    generation = read_optional_json(model_dir / "generation_config.json")
    return parse_model_config(read_json(path), generation, source=path)
