"""Which registered layout a vLLM cache is, read from its real tensors (never from a name).

vLLM 0.32 hands every KV connector one tensor per layer whose *shape* is always the
standardized [N blocks, H kv heads, B tokens, 2*D]; what differs is what the memory holds:

- CPU_ATTN (ISAs vec/vec16): dense [N, H, B, 2*D], per (block, head) K transposed [D, B]
  then V [B, D]: `vllm-cpu`. The amx ISA packs AMX tiles instead: refused.
- FLASH_ATTN / TRITON_ATTN (CUDA): K then V in every (token, head) row, with strides of the
  resolved KV cache layout: memory [N, B, H, 2*D] (`vllm-lbnhc`) or [N, H, B, 2*D]
  (`vllm-lbhnc`).
"""

from __future__ import annotations

import torch

from proto.kv_descriptor import KVDescriptor

CPU_VEC_ISAS = ("vec", "vec16")
# physical dim order of the [N, H, B, 2*D] view -> layout
_CUDA_ORDERS = {(0, 2, 1, 3): "vllm-lbnhc", (0, 1, 2, 3): "vllm-lbhnc"}
_CUDA_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN")


class UnsupportedCache(ValueError):
    """A vLLM cache whose memory layout hetserve has no descriptor for."""


def _physical_order(tensor: torch.Tensor) -> tuple[int, ...]:
    """Dims from outermost to innermost in memory (ties keep the view's order)."""
    return tuple(sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d)))


def layout_of(kv_cache: torch.Tensor, backend: str, isa: str | None = None) -> str:
    if kv_cache.dim() != 4:
        raise UnsupportedCache(
            f"{backend}: expected a [N, H, B, 2*D] cache, got {tuple(kv_cache.shape)}"
        )
    if backend == "CPU_ATTN":
        if isa not in CPU_VEC_ISAS:
            raise UnsupportedCache(
                f"CPU_ATTN ISA {isa!r} packs its cache unlike vllm-cpu (known: {CPU_VEC_ISAS})"
            )
        order: tuple[int, ...] = (0, 1, 2, 3)
        layout = "vllm-cpu"
    elif backend in _CUDA_BACKENDS:
        order = _physical_order(kv_cache)
        if order not in _CUDA_ORDERS:
            raise UnsupportedCache(f"{backend}: strides {kv_cache.stride()} match no known layout")
        layout = _CUDA_ORDERS[order]
    else:
        raise UnsupportedCache(f"attention backend {backend} has no hetserve layout yet")
    if not physical_view(kv_cache, order).is_contiguous():
        raise UnsupportedCache(f"{backend}: cache strides {kv_cache.stride()} are not dense")
    return layout


def physical_view(kv_cache: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    return kv_cache.permute(*order)


def physical_layer(kv_cache: torch.Tensor, layout: str) -> torch.Tensor:
    """The layer's tensor in its layout's storage order, as services/kv reads payloads."""
    order = next((o for o, name in _CUDA_ORDERS.items() if name == layout), (0, 1, 2, 3))
    return physical_view(kv_cache, order)


def descriptor_from_cache(
    kv_cache: torch.Tensor,
    *,
    backend: str,
    isa: str | None,
    num_layers: int,
    num_kv_heads: int,
    tp_size: int = 1,
    tp_rank: int = 0,
) -> KVDescriptor:
    """The descriptor of one rank's real cache (one layer's tensor stands for all)."""
    layout = layout_of(kv_cache, backend, isa)
    _, heads, block_size, two_d = kv_cache.shape
    desc = KVDescriptor(
        layout=layout,
        block_size=block_size,
        dtype=str(kv_cache.dtype).removeprefix("torch."),
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=two_d // 2,
        tp_size=tp_size,
        tp_rank=tp_rank,
    )
    if len(desc.heads) != heads:
        raise UnsupportedCache(
            f"cache holds {heads} kv heads, rank {tp_rank} of {tp_size} "
            f"should hold {len(desc.heads)}"
        )
    return desc
