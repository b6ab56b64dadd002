"""Build the native engine an instance's settings describe, joining its tensor-parallel group."""

from __future__ import annotations

import torch

from services.common.settings import WorkerSettings
from services.engine.engine import NativeEngine
from services.engine.tp.world import TPWorld, init_tp


def build_engine(settings: WorkerSettings) -> tuple[NativeEngine, TPWorld]:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    cuda = settings.device.startswith("cuda") or (not settings.device and torch.cuda.is_available())
    world = init_tp(
        settings.tp_rank,
        settings.tp_size,
        settings.tp_master_addr,
        settings.tp_master_port,
        "nccl" if cuda else "gloo",
        device=settings.device or None,
    )
    engine = NativeEngine(
        model_dir=settings.model,
        kv_layout=settings.kv_layout,
        block_size=settings.block_size,
        kv_dtype=settings.kv_dtype,
        num_blocks=settings.num_blocks,
        max_model_len=settings.max_model_len or None,
        prefix_caching=settings.prefix_caching,
        **world.engine_kwargs(),
    )
    return engine, world
