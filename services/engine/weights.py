"""Build a model from a local Hugging Face directory: config.json + *.safetensors.

Each checkpoint tensor is read on its own (memory-mapped) and handed to the layer that owns
it, which keeps its tensor-parallel shard (services/engine/parallel.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from services.engine.model import CausalLM, Rotary
from services.engine.parallel import TPGroup, load_replicated
from services.hf.config import ModelConfig, load_model_config

# checkpoint module name -> (the model's fused module, which part of it)
FUSED_PARTS: dict[str, tuple[str, str | int]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_PARTS_OF: dict[str, set[str | int | None]] = {
    fused: {p for f, p in FUSED_PARTS.values() if f == fused} for fused, _ in FUSED_PARTS.values()
}


def checkpoint_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    for file in files:
        with safe_open(file, framework="pt") as reader:
            for name in reader.keys():
                yield name, reader.get_tensor(name)


def _target(name: str) -> tuple[str, str | int | None]:
    """Checkpoint name -> (model parameter name, part of a fused parameter or None)."""
    *modules, param = name.split(".")
    if modules and modules[-1] in FUSED_PARTS:
        fused, part = FUSED_PARTS[modules[-1]]
        return ".".join([*modules[:-1], fused, param]), part
    return name, None


def load_weights(model: CausalLM, model_dir: Path) -> None:
    """Copy every checkpoint tensor (its shard) into `model`'s allocated parameters."""
    params = dict(model.named_parameters())
    loaded: dict[str, set[str | int | None]] = {}
    unexpected = []
    for name, tensor in checkpoint_tensors(model_dir):
        target, part = _target(name)
        if target not in params:
            unexpected.append(name)
            continue
        module_name, _, param_name = target.rpartition(".")
        module = model.get_submodule(module_name)
        loader = getattr(module, "load_weight", None)
        if loader is not None:
            loader(param_name, tensor, part)
        else:
            load_replicated(module, param_name, tensor)
        loaded.setdefault(target, set()).add(part)
    tie = model.cfg.tie_word_embeddings or "lm_head.weight" not in loaded
    if tie:
        loaded.pop("lm_head.weight", None)
    missing = [
        name
        for name in params
        if not (tie and name == "lm_head.weight")
        and loaded.get(name) != {None}
        and loaded.get(name) != _PARTS_OF.get(name.split(".")[-2])
    ]
    if missing or unexpected:
        raise ValueError(
            f"weights in {model_dir} do not fit a {model.cfg.model_type} model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight


def allocate_parameters(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Uninitialised real memory for every (meta) parameter. Module.to_empty would do, but on
    meta tensors it runs torch's Python reference kernels, whose first use imports sympy."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            empty = torch.empty(param.shape, dtype=dtype, device=device)
            setattr(module, name, nn.Parameter(empty, requires_grad=param.requires_grad))


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    tp: TPGroup | None = None,
) -> tuple[CausalLM, ModelConfig]:
    """The model (this rank's shard of it): built on the meta device, given uninitialised
    memory on `device`, then filled from the checkpoint, so nothing is initialised twice."""
    model_dir = Path(model_dir)
    cfg = load_model_config(model_dir)
    target = dtype or getattr(torch, cfg.torch_dtype, torch.float32)
    with torch.device("meta"):
        model = CausalLM(cfg, tp)
    allocate_parameters(model, torch.device(device), target)
    load_weights(model, model_dir)
    # Buffers (rotary inverse frequencies) are not in the file: build them for real, in float32.
    model.rotary = Rotary(cfg).to(device)
    return model.eval(), cfg
