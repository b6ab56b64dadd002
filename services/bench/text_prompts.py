"""Text prompts of an exact token count for a model's tokenizer, as a JSONL dataset that
hetserve's load generator (`--dataset`) and vLLM's (`--dataset-name custom`) both read, so
two generators send the very same prompts.

Each prompt is random words of the vocabulary (tokens that decode to a space and letters),
one token each, so its length survives a round trip through the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


def word_tokens(tokenizer: Tokenizer) -> list[str]:
    """The vocabulary's whole words with a leading space (" the", " house"), sorted."""
    words = set()
    for token_id in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([token_id])
        if len(text) > 3 and text[0] == " " and text[1:].isalpha() and text[1:].islower():
            words.add(text)
    return sorted(words)


def exact_prompts(tokenizer: Tokenizer, n: int, tokens: int, seed: int) -> list[str]:
    """`n` prompts of random vocabulary words that encode to exactly `tokens` tokens."""
    words = [w for w in word_tokens(tokenizer) if len(tokenizer.encode(w).ids) == 1]
    rng = np.random.default_rng(seed)
    prompts = []
    while len(prompts) < n:
        text = "".join(words[i] for i in rng.integers(0, len(words), size=tokens)).lstrip()
        if len(tokenizer.encode(text, add_special_tokens=False).ids) == tokens:
            prompts.append(text)
    return prompts


def write_dataset(path: Path, prompts: list[str], output_tokens: int) -> Path:
    """JSONL rows {"prompt", "max_tokens", "output_tokens"} (hetserve reads the first two,
    vLLM's custom dataset the first and the last)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = (
        {"prompt": p, "max_tokens": output_tokens, "output_tokens": output_tokens} for p in prompts
    )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
