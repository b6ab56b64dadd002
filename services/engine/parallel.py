"""Tensor-parallel linear layers in the vLLM / nano-vllm manner.

Column-parallel layers split output features: each rank computes its slice of the output and
nothing is exchanged. Row-parallel layers split input features: each rank's output is a partial
sum that an all-reduce over the TP group completes. Attention is column-parallel over heads
(q, k, v) and row-parallel in o_proj; the MLP is column-parallel in gate/up and row-parallel in
down. Embedding and lm_head stay replicated.

Every layer loads its own shard from the full Hugging Face tensor (`load_weight`), so the
model code stays plain and a checkpoint never has to be re-sharded on disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from proto.kv_descriptor import kv_heads_of_rank as descriptor_kv_heads
from services.engine.linear import linear


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in a tensor-parallel instance."""

    rank: int = 0
    size: int = 1
    # None with size > 1 means torch.distributed's default group (torch's own convention)
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tp rank {self.rank} outside tp size {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place; no torch.distributed call at all for size 1."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x


def checked_tp_group(rank: int, size: int, group: dist.ProcessGroup | None) -> TPGroup:
    """A TPGroup checked against torch.distributed's view of the same group."""
    tp = TPGroup(rank, size, group)
    if size == 1:
        return tp
    if not dist.is_initialized():
        raise ValueError(
            f"tp_size {size} needs torch.distributed initialised first "
            "(services.engine.tp.world.init_tp)"
        )
    actual = (dist.get_rank(group), dist.get_world_size(group))
    if actual != (rank, size):
        raise ValueError(
            f"tp_rank/tp_size {rank}/{size} disagree with the process group's {actual[0]}/{actual[1]}"
        )
    return tp


def split_evenly(total: int, tp: TPGroup, what: str) -> int:
    if total % tp.size:
        raise ValueError(f"{total} {what} do not split evenly over tensor parallel size {tp.size}")
    return total // tp.size


def kv_heads_of_rank(num_kv_heads: int, tp: TPGroup) -> range:
    """KV heads this rank holds (proto.kv_descriptor's rule, the descriptor's too), after
    checking that they split, or replicate, evenly over the ranks."""
    if tp.size <= num_kv_heads:
        split_evenly(num_kv_heads, tp, "KV heads")
    elif tp.size % num_kv_heads:
        raise ValueError(
            f"tensor parallel size {tp.size} is not a multiple of the {num_kv_heads} KV heads "
            "it would replicate"
        )
    return descriptor_kv_heads(num_kv_heads, tp.size, tp.rank)


def _copy_into(target: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if target.shape != value.shape:
        raise ValueError(f"{what}: checkpoint shard {tuple(value.shape)} != {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value)


def load_replicated(module: nn.Module, name: str, full: torch.Tensor) -> None:
    """The loader of every parameter that is not sharded: the whole tensor."""
    _copy_into(getattr(module, name), full, f"{type(module).__name__}.{name}")


class ReplicatedLinear(nn.Module):
    """The whole weight on every rank (lm_head); the base of the sharded layers, which hold
    their shard's shape. Parameters are left uninitialised: a checkpoint fills them."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ReplicatedEmbedding(nn.Module):
    """nn.Embedding without its random initialisation (on the meta device, nn.Embedding's
    normal_ alone imports torch._dynamo: seconds of start-up)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class ColumnParallelLinear(ReplicatedLinear):
    """y[:, shard] = x @ W[shard].T: rows of W (output features) split over ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup):
        super().__init__(in_features, split_evenly(out_features, tp, "output features"), bias)
        self.tp = tp

    def load_weight(self, name: str, full: torch.Tensor, shard_id: object = None) -> None:
        param = getattr(self, name)
        rows = param.shape[0]
        _copy_into(param, full.narrow(0, self.tp.rank * rows, rows), f"column-parallel {name}")


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers of the same input in one matmul (gate_proj + up_proj):
    each rank's weight is [part 0 shard; part 1 shard; ...]."""

    def __init__(self, in_features: int, out_features: list[int], bias: bool, tp: TPGroup):
        sizes = [split_evenly(size, tp, "output features") for size in out_features]
        super().__init__(in_features, sum(out_features), bias, tp)
        self.full_sizes = out_features
        self.sizes = sizes

    def load_weight(self, name: str, full: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:  # already merged: a checkpoint written from a tp=1 model
            for part, tensor in enumerate(full.split(self.full_sizes)):
                self.load_weight(name, tensor, part)
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.sizes):
            raise ValueError(f"merged layer has no part {shard_id!r}")
        size, offset = self.sizes[shard_id], sum(self.sizes[:shard_id])
        target = getattr(self, name).data.narrow(0, offset, size)
        _copy_into(target, full.narrow(0, self.tp.rank * size, size), f"part {shard_id} {name}")


class QKVParallelLinear(ReplicatedLinear):
    """q, k and v projections in one matmul, split by heads as vLLM's QKVParallelLinear:
    q heads evenly, KV heads by `kv_heads_of_rank` (replicated when tp > KV heads)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TPGroup,
    ):
        kv_heads = kv_heads_of_rank(num_kv_heads, tp)
        local_heads = split_evenly(num_heads, tp, "attention heads")
        super().__init__(hidden_size, (local_heads + 2 * len(kv_heads)) * head_dim, bias)
        self.tp = tp
        self.kv_heads = kv_heads
        self.num_heads = local_heads  # of this rank
        self.num_kv_heads = len(kv_heads)  # of this rank
        self.head_dim = head_dim
        self.full_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]

    @property
    def sizes(self) -> list[int]:
        """Features of q, k and v in this rank's output."""
        d = self.head_dim
        return [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]

    def load_weight(self, name: str, full: torch.Tensor, shard_id: object = None) -> None:
        if shard_id is None:  # already fused: a checkpoint written from a tp=1 model
            for part, tensor in zip("qkv", full.split(self.full_sizes), strict=True):
                self.load_weight(name, tensor, part)
            return
        d = self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            offset, start, size = 0, self.tp.rank * q, q
        elif shard_id in ("k", "v"):
            offset = q if shard_id == "k" else q + kv
            start, size = self.kv_heads.start * d, kv
        else:
            raise ValueError(f"QKV layer has no part {shard_id!r}")
        target = getattr(self, name).data.narrow(0, offset, size)
        _copy_into(target, full.narrow(0, start, size), f"{shard_id} {name}")


class RowParallelLinear(ReplicatedLinear):
    """y = sum over ranks of x[:, shard] @ W[:, shard].T: columns of W split, output all-reduced.
    The bias is replicated and added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup):
        super().__init__(split_evenly(in_features, tp, "input features"), out_features, bias)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def load_weight(self, name: str, full: torch.Tensor, shard_id: object = None) -> None:
        param = getattr(self, name)
        if name == "bias":
            _copy_into(param, full, "row-parallel bias")
            return
        cols = param.shape[1]
        _copy_into(param, full.narrow(1, self.tp.rank * cols, cols), f"row-parallel {name}")
