"""The registry of real engines' KV layouts: data only, one entry per engine and backend.

Every layout also lists float32: hetserve's native engine hosts any layout on CPU in float32
(the engines themselves store half precision or fp8), so the float32 end-to-end checks can put
every layout on both sides of a pair. Sources: ../shared/research/kv-layouts.md.
"""

from __future__ import annotations

from proto.layout_spec import CANONICAL_DIMS, LayoutSpec, Plane

LAYOUTS: dict[str, LayoutSpec] = {}


def register(spec: LayoutSpec) -> LayoutSpec:
    if spec.name in LAYOUTS:
        raise ValueError(f"layout {spec.name!r} registered twice")
    LAYOUTS[spec.name] = spec
    return spec


def get_layout(name: str) -> LayoutSpec:
    try:
        return LAYOUTS[name]
    except KeyError:
        known = ", ".join(sorted(LAYOUTS))
        raise ValueError(f"unknown KV layout {name!r}; known: {known}") from None


_NATIVE = "float32"  # see the module docstring
_BF_FP = ("bfloat16", "float16")
_KV_FIRST = ("KV", "N", "B", "H", "D")
_BLOCKS_FIRST = ("N", "KV", "B", "H", "D")


def _joint(
    name: str,
    engine: str,
    backend: str,
    dims: tuple[str, ...],
    *,
    dtypes: tuple[str, ...],
    block_sizes: tuple[int, ...],
    notes: str,
) -> None:
    """A layout whose K and V share one tensor, split on its KV axis."""
    k, v = Plane("kv", dims, 0), Plane("kv", dims, 1)
    register(
        LayoutSpec(name, engine, backend, {"kv": dims}, k, v, dtypes, block_sizes, notes=notes)
    )


def _separate(
    name: str,
    engine: str,
    backend: str,
    dims: tuple[str, ...],
    *,
    dtypes: tuple[str, ...],
    block_sizes: tuple[int, ...],
    notes: str,
    reserved_blocks: int = 0,
) -> None:
    """A layout with one K and one V tensor of the same shape."""
    k, v = Plane("k", CANONICAL_DIMS), Plane("v", CANONICAL_DIMS)
    storage = {"k": dims, "v": dims}
    register(
        LayoutSpec(
            name,
            engine,
            backend,
            storage,
            k,
            v,
            dtypes,
            block_sizes,
            reserved_blocks=reserved_blocks,
            notes=notes,
        )
    )


_joint(
    "vllm-flash",
    "vLLM",
    "FLASH_ATTN (NHD)",
    _KV_FIRST,
    dtypes=(_NATIVE, *_BF_FP, "float8_e4m3fn"),
    block_sizes=(16, 32, 64, 128),
    notes="vLLM < 0.32: vllm/v1/attention/backends/flash_attn.py get_kv_cache_shape (2, N, B, H, D)",
)
_joint(
    "vllm-flash-hnd",
    "vLLM",
    "FLASH_ATTN (HND stride order)",
    ("KV", "N", "H", "B", "D"),
    dtypes=(_NATIVE, *_BF_FP, "float8_e4m3fn"),
    block_sizes=(16, 32, 64, 128),
    notes="flash_attn.py get_kv_cache_stride_order (0, 1, 3, 2, 4): HND in memory",
)
_joint(
    "vllm-flashinfer",
    "vLLM",
    "FLASHINFER (NHD)",
    _BLOCKS_FIRST,
    dtypes=(_NATIVE, *_BF_FP, "float8_e4m3fn", "float8_e5m2"),
    block_sizes=(16, 32, 64),
    notes="vllm/v1/attention/backends/flashinfer.py get_kv_cache_shape (N, 2, B, H, D)",
)
_joint(
    "vllm-triton",
    "vLLM",
    "TRITON_ATTN (also ROCm)",
    _BLOCKS_FIRST,
    dtypes=(_NATIVE, *_BF_FP, "float8_e4m3fn", "float8_e4m3fnuz"),
    block_sizes=(16, 32, 64, 128),
    notes="vllm/v1/attention/backends/triton_attn.py (N, 2, B, H, D); fp8 stored as uint8 "
    "with per-tensor _k_scale/_v_scale on the layer (e4m3fnuz on ROCm MI300)",
)
register(
    LayoutSpec(
        name="vllm-paged-legacy",
        engine="vLLM",
        backend="legacy PagedAttention (old ROCm path)",
        storage={"kv": ("KV", "N", "B*H*D")},
        k=Plane("kv", ("KV", "N", "H", "Dx", "B", "x"), 0),
        v=Plane("kv", ("KV", "N", "H", "D", "B"), 1),
        dtypes=(_NATIVE, *_BF_FP, "float8_e4m3fn", "float8_e4m3fnuz"),
        block_sizes=(8, 16, 32),
        pack_bytes=16,
        notes="vllm/attention/ops/paged_attn.py split_kv_cache: K [N, H, D/x, B, x], "
        "V [N, H, D, B], x = 16 bytes / element size",
    )
)
register(
    LayoutSpec(
        name="vllm-cpu",
        engine="vLLM",
        backend="CPU attention",
        storage={"kv": ("N", "H", "B", "2*D")},
        # per block and head: K transposed [D, B], then V [B, D]
        k=Plane("kv", ("N", "H", "KV", "D", "B"), 0),
        v=Plane("kv", ("N", "H", "KV", "B", "D"), 1),
        dtypes=(_NATIVE, *_BF_FP),
        block_sizes=(32, 64, 128),  # vLLM 0.32 CPU_ATTN refuses 16 (MultipleOf(32))
        notes="vllm/v1/attention/backends/cpu_attn.py: [N, H, B, 2*D]; checked against "
        "vllm-cpu 0.32's real cache (ISA vec/vec16; the amx ISA packs tiles differently)",
    )
)
# vLLM >= 0.32 on CUDA: FLASH_ATTN and TRITON_ATTN read one standardized per-layer tensor of
# shape [N, H, B, 2*D] (K then V in each token-head row); its strides follow the resolved
# KVCacheLayout, so memory is [N, B, H, 2*D] (LBNHC, the default) or [N, H, B, 2*D] (LBHNC).
for _name, _order, _layout in (
    ("vllm-lbnhc", ("N", "B", "H"), "LBNHC (NHD, the default)"),
    ("vllm-lbhnc", ("N", "H", "B"), "LBHNC (HND)"),
):
    register(
        LayoutSpec(
            name=_name,
            engine="vLLM>=0.32",
            backend=f"FLASH_ATTN / TRITON_ATTN, KV cache layout {_layout}",
            storage={"kv": (*_order, "2*D")},
            k=Plane("kv", (*_order, "KV", "D"), 0),
            v=Plane("kv", (*_order, "KV", "D"), 1),
            dtypes=(_NATIVE, *_BF_FP, "float8_e4m3fn"),
            block_sizes=(16, 32, 64, 128),
            notes="vllm/v1/attention/backends/flash_attn.py: kv_cache.transpose(1, 2)"
            ".split(head_size, dim=-1) of the [N, H, B, 2*D] view; read from vLLM 0.32 source, "
            "not yet checked on a GPU",
        )
    )
_separate(
    "ascend",
    "vllm-ascend",
    "Ascend attention_v1 (separate K/V)",
    ("N", "B", "H", "D"),
    dtypes=(_NATIVE, *_BF_FP),
    block_sizes=(128,),
    notes="vllm_ascend/attention/attention_v1.py, worker/model_runner_v1.py; block 128 "
    "forced with prefix caching / chunked prefill",
)
register(
    LayoutSpec(
        name="ascend-310p",
        engine="vllm-ascend",
        backend="Ascend 310P attention (NZ fractal)",
        storage={"kv": ("KV", "N", "H*Dx", "B", "x")},
        k=Plane("kv", ("KV", "N", "H", "Dx", "B", "x"), 0),
        v=Plane("kv", ("KV", "N", "H", "Dx", "B", "x"), 1),
        dtypes=(_NATIVE, "float16"),
        block_sizes=(64, 128),
        pack_elems=16,
        notes="vllm_ascend/_310p/attention/attention_v1.py: (2, N, H*D/16, B, 16); the 16-element "
        "fractals never straddle heads because head_dim is a multiple of 16",
    )
)
_separate(
    "gaudi",
    "vllm-gaudi (Intel Gaudi)",
    "HPU paged attention",
    ("N*B", "H", "D"),
    dtypes=(_NATIVE, "bfloat16"),
    block_sizes=(128,),
    reserved_blocks=1,
    notes="vllm_gaudi hpu_paged_attn.py get_kv_cache_shape: K and V each (N*B, H, D) plus one "
    "spare block; its fp8 uses per-token bf16 scales, which this registry does not model",
)
_separate(
    "sglang",
    "SGLang",
    "MHA token pool",
    ("N*B", "H", "D"),
    dtypes=(_NATIVE, *_BF_FP, "float8_e4m3fn", "float8_e4m3fnuz"),
    block_sizes=(1, 16, 32, 64),
    reserved_blocks=1,
    notes="sglang/srt/mem_cache/memory_pool.py MHATokenToKVPool: k_buffer[l], v_buffer[l] of "
    "(slots + page_size, H, D); a block is a page (page_size 1 by default) and the reserved "
    "leading page holds the dummy slot 0, hence N counts it and reserved_blocks = 1",
)
_joint(
    "tensorrt-llm",
    "TensorRT-LLM",
    "KV cache manager (multi-layer HND blocks)",
    ("N", "L", "KV", "H", "B", "D"),
    dtypes=(_NATIVE, *_BF_FP, "float8_e4m3fn"),
    block_sizes=(8, 16, 32, 64, 128),
    notes="tensorrt_llm KVBlockArray::getKVLocalIdx, _torch/pyexecutor/resource_manager.py: a "
    "block holds every layer of its pool x kvFactor 2 x [H, tokens_per_block, D]; a frame "
    "carries one layer of it (L = 1)",
)
