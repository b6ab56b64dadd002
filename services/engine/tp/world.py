"""This process's place in a tensor-parallel instance: joining its process group."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPWorld:
    """This process's rank in a tensor-parallel instance and the groups it talks over."""

    rank: int
    size: int
    group: dist.ProcessGroup | None  # tensors (nccl or gloo); None for size 1
    control: dist.ProcessGroup | None  # step messages (gloo); None for size 1
    device: torch.device

    def engine_kwargs(self) -> dict[str, Any]:
        """NativeEngine's arguments for this rank."""
        return {
            "tp_rank": self.rank,
            "tp_size": self.size,
            "tp_group": self.group,
            "device": self.device,
        }

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_tp(
    rank: int,
    size: int,
    master_addr: str,
    master_port: int,
    backend: str = "gloo",
    *,
    device: torch.device | str | None = None,
    timeout: timedelta = timedelta(minutes=10),
    control_timeout: timedelta = timedelta(days=30),
) -> TPWorld:
    """Join the instance's process group (every rank calls this, with the same master).

    `control_timeout` bounds how long a follower waits for the leader's next step, i.e. how
    long the instance may stay idle; a leader that dies is noticed at once (the connection
    closes). `device` defaults to cuda:(rank % GPUs) for nccl and cpu for gloo.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be gloo or nccl, not {backend!r}")
    if device is None:
        device = f"cuda:{rank % torch.cuda.device_count()}" if backend == "nccl" else "cpu"
    device = torch.device(device)
    if size == 1:
        return TPWorld(0, 1, None, None, device)
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=size,
        timeout=timeout,
    )
    control = dist.new_group(backend="gloo", timeout=control_timeout)
    return TPWorld(rank, size, dist.group.WORLD, control, device)
