"""Random small planning instances (2-3 GPU types, at most 16 GPUs) for the oracle test."""

from __future__ import annotations

import random
from typing import Any

from services.planner.catalog import builtin_catalog

SMALL_MODELS = ("llama-3-8b", "qwen2.5-7b", "mistral-7b", "qwen2.5-32b")


def random_spec(
    rng: random.Random,
    types: tuple[int, ...] = (2, 3),
    max_gpus: int = 16,
    tp: tuple[int, ...] = (1, 2, 4),
) -> dict[str, Any]:
    gpus = rng.sample(sorted(builtin_catalog()), rng.choice(types))
    total = rng.randint(len(gpus) * 2, max_gpus)
    cuts = sorted(rng.sample(range(1, total), len(gpus) - 1))
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    return {
        "model": rng.choice(SMALL_MODELS),
        "inventory": [
            {"gpu": g, "count": n, "price_per_hour": round(rng.uniform(0.5, 5.0), 2)}
            for g, n in zip(gpus, counts, strict=True)
        ],
        "network": {"inter_pool_gbps": rng.choice((5, 25, 100, 400)), "intra_pool_gbps": 400},
        "workload": {
            "rate": round(rng.uniform(0.5, 12.0), 2),
            "prompt_tokens": {
                "mean": rng.choice((256, 1024, 2048)),
                "distribution": "exponential",
                "max": 8192,
            },
            "output_tokens": {
                "mean": rng.choice((64, 256)),
                "distribution": "exponential",
                "max": 2048,
            },
        },
        "slo": {"ttft_s": rng.choice((0.5, 1.0, 2.0)), "tpot_s": rng.choice((0.03, 0.05, 0.1))},
        "search": {"tp": list(tp), "pp": [1, 2]},
    }
