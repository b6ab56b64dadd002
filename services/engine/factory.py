"""Build the engine an instance's settings name."""

from __future__ import annotations

import torch

from services.common.settings import WorkerSettings
from services.engine.engine import NativeEngine

ENGINES = {"native": NativeEngine}


def build_engine(settings: WorkerSettings) -> NativeEngine:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    try:
        engine_cls = ENGINES[settings.engine]
    except KeyError:
        raise ValueError(
            f"unknown engine {settings.engine!r}; available: {', '.join(ENGINES)}"
        ) from None
    return engine_cls(
        model_dir=settings.model,
        kv_layout=settings.kv_layout,
        block_size=settings.block_size,
        kv_dtype=settings.kv_dtype,
        num_blocks=settings.num_blocks,
        device=settings.device or None,
        max_model_len=settings.max_model_len or None,
    )
