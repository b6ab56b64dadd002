"""A model directory has what every service reads from it: config.json (a supported
architecture), tokenizer.json (the gateway, vLLM) and the weights."""

from __future__ import annotations

from pathlib import Path

from services.cli.preflight.report import Report
from services.hf.config import ModelConfig, load_model_config

_MAKE_DEMO = "hetserve model fetch (or a random tiny one: hetserve model tiny models/tiny-llama)"


def check_model_dir(model: str, field: str, report: Report) -> ModelConfig | None:
    """The model's config, or None with the reasons in `report`."""
    path = Path(model)
    point = f"point {field} at a Hugging Face model directory"
    if not path.is_dir():
        report.refuse(
            field,
            f"model directory {model} does not exist",
            f"{point}, or build the demo model with: {_MAKE_DEMO}",
        )
        return None
    if not (path / "config.json").is_file():
        report.refuse(
            field,
            f"{model} has no config.json, so it is not a Hugging Face model directory",
            f"{point} (config.json, tokenizer.json, *.safetensors)",
        )
        return None
    try:
        cfg = load_model_config(path)
    except ValueError as exc:
        report.refuse(field, str(exc), f"{point} of a supported model")
        return None
    if not (path / "tokenizer.json").is_file():
        report.refuse(
            field,
            f"{model} has no tokenizer.json (the gateway needs a fast tokenizer)",
            "save the model's tokenizer with transformers (tokenizer.save_pretrained)",
        )
    if not any(path.glob("*.safetensors")):
        report.refuse(
            field,
            f"{model} has no *.safetensors weights",
            "save the weights as safetensors (model.save_pretrained(safe_serialization=True))",
        )
    return cfg
