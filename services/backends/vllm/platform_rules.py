"""What vLLM accepts on this machine's platform, asked of vLLM itself.

One place for the rules that `engine_args.check_model` enforces when an instance starts and
`hetserve check` / `hetserve up` before anything starts: vLLM would otherwise only find out
at its first request (or after the rest of the system came up).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

# vLLM 0.32's CPU attention (CPU_ATTN) takes block sizes that are a multiple of this
CPU_BLOCK_MULTIPLE = 32
# The cache layout vLLM allocates per platform (services/backends/vllm/layout.py reads it from
# the real tensor at start-up): CPU_ATTN on CPU; FLASH_ATTN / TRITON_ATTN on CUDA in their
# default KV cache layout (LBNHC). Elsewhere hetserve cannot say before vLLM allocates.
PLATFORM_LAYOUTS = {"cpu": "vllm-cpu", "cuda": "vllm-lbnhc"}


@dataclass(frozen=True)
class VllmPlatform:
    device: str  # vLLM's device type: cpu, cuda, ...
    kv_layout: str | None  # the layout its cache will be; None: not known before it allocates
    dtypes: tuple[str, ...]  # model dtypes the platform runs
    head_sizes: tuple[int, ...] | None  # attention head sizes it runs; None: not restricted
    block_multiple: int  # block sizes must be a multiple of this


@dataclass(frozen=True)
class Refusal:
    """Something vLLM will refuse: the instance setting at fault, why, and what to do."""

    field: str  # block_size, dtype or model
    reason: str
    fix: str


@cache
def current_platform() -> VllmPlatform:
    """This machine's platform as vLLM sees it (imports vLLM: seconds, once per process)."""
    from vllm.platforms import current_platform as platform

    head_sizes: tuple[int, ...] | None = None
    block_multiple = 1
    if platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        head_sizes = tuple(CPUAttentionBackend.get_supported_head_sizes())
        block_multiple = CPU_BLOCK_MULTIPLE
    return VllmPlatform(
        device=platform.device_type,
        kv_layout=PLATFORM_LAYOUTS.get(platform.device_type),
        dtypes=tuple(str(d).removeprefix("torch.") for d in platform.supported_dtypes),
        head_sizes=head_sizes,
        block_multiple=block_multiple,
    )


def refusals(
    platform: VllmPlatform, *, head_dim: int, block_size: int, dtype: str
) -> list[Refusal]:
    """What vLLM on `platform` would refuse about an instance of this model and settings."""
    out: list[Refusal] = []
    where = f"vLLM's {platform.device.upper()} attention"
    if platform.head_sizes is not None and head_dim not in platform.head_sizes:
        out.append(
            Refusal(
                "model",
                f"{where} takes head_dim in {list(platform.head_sizes)}, the model has {head_dim}",
                "serve this model with engine: native",
            )
        )
    if block_size % platform.block_multiple:
        multiple = platform.block_multiple
        out.append(
            Refusal(
                "block_size",
                f"{where} needs a block size multiple of {multiple}, not {block_size}",
                f"set block_size to {multiple} (or another multiple of {multiple})",
            )
        )
    if dtype not in platform.dtypes:
        out.append(
            Refusal(
                "dtype",
                f"vLLM on {platform.device} runs {list(platform.dtypes)}, not {dtype}",
                f"set dtype to one of {', '.join(platform.dtypes)}",
            )
        )
    return out
