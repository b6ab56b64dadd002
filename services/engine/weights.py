"""Build a model from a local Hugging Face directory: config.json + *.safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from services.engine.hf_config import ModelConfig, load_model_config
from services.engine.model import CausalLM


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return state


def load_model(
    model_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> tuple[CausalLM, ModelConfig]:
    """Weights are created on the meta device and assigned from the file: no double copy."""
    model_dir = Path(model_dir)
    cfg = load_model_config(model_dir)
    with torch.device("meta"):
        model = CausalLM(cfg)
    state = load_state_dict(model_dir)
    if cfg.tie_word_embeddings or "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"weights in {model_dir} do not fit a {cfg.model_type} model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    # Buffers (rotary inverse frequencies) are not in the file: build them for real.
    model.rotary = type(model.rotary)(cfg)
    target = dtype or getattr(torch, cfg.torch_dtype, torch.float32)
    model = model.to(device=device, dtype=target)
    model.rotary.inv_freq = model.rotary.inv_freq.float()
    return model.eval(), cfg
