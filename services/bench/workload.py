"""The requests of a run and when they are sent.

Token-id prompts (for /v1/completions) have exactly the sampled length. Text prompts (for chat)
are random common words, about one token each, so their length in tokens is approximate.
A JSONL dataset gives rows {"prompt": str | [ids], "max_tokens": int}; a row without
max_tokens takes one from the output distribution. Rows are used in file order, cycling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.bench.distributions import LengthDistribution

FIRST_SAFE_TOKEN_ID = 10  # below this most vocabularies keep special tokens (bos, eos, pad)

_WORDS = (
    "the of and to in is was for on that with as at by from this have not are but be his "
    "they one all were her there can been has more if will would when who what so about out "
    "time up into only some could them other than then now look come its over think also back "
    "after use two how our work first well way even new want because any these give day most"
).split()


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]
    max_tokens: int
    prompt_len: int | None  # exact prompt tokens when known (token-id prompts)


def random_token_prompts(
    rng: np.random.Generator, lengths: np.ndarray, vocab_size: int
) -> list[list[int]]:
    """One list of random token ids in [FIRST_SAFE_TOKEN_ID, vocab_size) per length."""
    if vocab_size <= FIRST_SAFE_TOKEN_ID:
        raise ValueError(f"vocab size must be > {FIRST_SAFE_TOKEN_ID}, got {vocab_size}")
    return [rng.integers(FIRST_SAFE_TOKEN_ID, vocab_size, size=int(n)).tolist() for n in lengths]


def random_text_prompts(rng: np.random.Generator, lengths: np.ndarray) -> list[str]:
    """One string of `n` random common words per length."""
    return [" ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=int(n))) for n in lengths]


def synthetic_requests(
    rng: np.random.Generator,
    n: int,
    prompt_dist: LengthDistribution,
    output_dist: LengthDistribution,
    *,
    token_ids: bool,
    vocab_size: int,
) -> list[BenchRequest]:
    prompt_lens = prompt_dist.sample(rng, n)
    max_tokens = output_dist.sample(rng, n)
    if token_ids:
        prompts: list[str | list[int]] = list(random_token_prompts(rng, prompt_lens, vocab_size))
        known = [int(x) for x in prompt_lens]
        return [
            BenchRequest(p, int(m), k) for p, m, k in zip(prompts, max_tokens, known, strict=True)
        ]
    texts = random_text_prompts(rng, prompt_lens)
    return [BenchRequest(p, int(m), None) for p, m in zip(texts, max_tokens, strict=True)]


def load_dataset(path: str | Path) -> list[tuple[str | list[int], int | None]]:
    """(prompt, max_tokens or None) per non-empty JSONL line. Raises ValueError on bad rows."""
    rows: list[tuple[str | list[int], int | None]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object")
            prompt = row.get("prompt")
            is_ids = isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            )
            if not (isinstance(prompt, str) or is_ids) or not prompt:
                raise ValueError(f"{where}: 'prompt' must be a non-empty string or list of ints")
            max_tokens = row.get("max_tokens")
            if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
                raise ValueError(f"{where}: 'max_tokens' must be an integer >= 1")
            rows.append((prompt, max_tokens))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def dataset_requests(
    rng: np.random.Generator,
    n: int,
    rows: list[tuple[str | list[int], int | None]],
    output_dist: LengthDistribution,
) -> list[BenchRequest]:
    sampled = output_dist.sample(rng, n)
    out = []
    for i in range(n):
        prompt, max_tokens = rows[i % len(rows)]
        known = len(prompt) if isinstance(prompt, list) else None
        out.append(BenchRequest(prompt, max_tokens or int(sampled[i]), known))
    return out


def poisson_offsets(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """Send times in seconds from the start for a Poisson process of `rate` requests/s.

    The first request goes at 0; the gaps are exponential with mean 1/rate. An infinite rate
    sends everything at once.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if n <= 0:
        return np.zeros(0)
    if np.isinf(rate):
        return np.zeros(n)
    gaps = rng.exponential(1.0 / rate, size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])
