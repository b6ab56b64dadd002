"""The oracle nobody here wrote: Hugging Face transformers' greedy tokens on the same weights."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any


@cache
def hf_model(model_dir: str) -> Any:
    """The model in float32, loaded once per directory (transformers imported only here)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy `generate`, EOS ignored: exactly `max_new_tokens` token ids."""
    import torch

    model = hf_model(str(model_dir))
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out[0, len(prompt_ids) :].tolist()
