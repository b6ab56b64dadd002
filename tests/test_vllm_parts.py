"""The vLLM integration's parts on their own: the layout read from a cache tensor's strides,
the shared-memory staging cache, start-up refusals, topology checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from services.backends.vllm.engine_args import vllm_missing_reason
from services.backends.vllm.layout import UnsupportedCache, descriptor_from_cache, physical_layer
from services.backends.vllm.staging import open_staging, staging_path
from services.cli.topology import WorkerSpec
from services.common.settings import WorkerSettings
from services.kv.payload import gather_payload, payload_to_tokens

N, H, B, D = 6, 2, 32, 32


def strided_cache(order: tuple[int, ...]) -> torch.Tensor:
    """vLLM 0.32's per-layer [N, H, B, 2*D] view over memory laid out in `order`, as
    allocate_kv_cache builds it (a dense buffer, then a permuted view)."""
    shape = (N, H, B, 2 * D)
    physical = torch.randn([shape[d] for d in order])
    inverse = [order.index(d) for d in range(4)]
    return physical.permute(*inverse)


@pytest.mark.parametrize(
    ("order", "layout"), [((0, 2, 1, 3), "vllm-lbnhc"), ((0, 1, 2, 3), "vllm-lbhnc")]
)
def test_flash_attn_layout_is_read_from_strides_and_reads_what_vllm_reads(
    order: tuple[int, ...], layout: str
) -> None:
    cache = strided_cache(order)
    desc = descriptor_from_cache(
        cache, backend="FLASH_ATTN", isa=None, num_layers=1, num_kv_heads=H
    )
    assert (desc.layout, desc.block_size, desc.head_dim, desc.dtype) == (layout, B, D, "float32")
    # What vLLM's FLASH_ATTN forward reads: kv_cache.transpose(1, 2).split(head_size, dim=-1)
    key_cache, value_cache = cache.transpose(1, 2).split(D, dim=-1)  # [N, B, H, D] each
    blocks = torch.tensor([4, 1])
    payload = gather_payload(desc, {"kv": physical_layer(cache, layout)}, blocks)
    k, v = payload_to_tokens(desc, payload, 2 * B)
    assert torch.equal(k, key_cache[blocks].reshape(2 * B, H, D))
    assert torch.equal(v, value_cache[blocks].reshape(2 * B, H, D))


def test_cpu_attention_cache_is_vllm_cpu_only_for_its_vec_isas() -> None:
    cache = strided_cache((0, 1, 2, 3)).to(torch.bfloat16)
    for isa in ("vec", "vec16"):
        desc = descriptor_from_cache(
            cache, backend="CPU_ATTN", isa=isa, num_layers=4, num_kv_heads=H
        )
        assert (desc.layout, desc.dtype, desc.num_layers) == ("vllm-cpu", "bfloat16", 4)
    with pytest.raises(UnsupportedCache, match="ISA 'amx' packs its cache unlike vllm-cpu"):
        descriptor_from_cache(cache, backend="CPU_ATTN", isa="amx", num_layers=4, num_kv_heads=H)


@pytest.mark.parametrize(
    ("cache", "backend", "reason"),
    [
        (strided_cache((1, 0, 2, 3)), "FLASH_ATTN", "match no known layout"),
        (strided_cache((0, 1, 2, 3)), "FLASHINFER", "has no hetserve layout"),
        (torch.randn(N, H, B, 4 * D)[..., : 2 * D], "CPU_ATTN", "not dense"),
        (torch.randn(N, H, B), "CPU_ATTN", "expected a [N, H, B, 2*D] cache"),
    ],
)
def test_unknown_caches_are_refused_with_the_reason(
    cache: torch.Tensor, backend: str, reason: str
) -> None:
    with pytest.raises(UnsupportedCache, match=reason.replace("[", r"\[").replace("*", r"\*")):
        descriptor_from_cache(cache, backend=backend, isa="vec", num_layers=1, num_kv_heads=H)


def test_tensor_parallel_rank_must_hold_its_share_of_heads() -> None:
    cache = strided_cache((0, 2, 1, 3))  # 2 heads
    desc = descriptor_from_cache(
        cache, backend="FLASH_ATTN", isa=None, num_layers=1, num_kv_heads=4, tp_size=2, tp_rank=1
    )
    assert list(desc.heads) == [2, 3]
    with pytest.raises(UnsupportedCache, match="should hold 1"):
        descriptor_from_cache(
            cache,
            backend="FLASH_ATTN",
            isa=None,
            num_layers=1,
            num_kv_heads=4,
            tp_size=4,
            tp_rank=0,
        )


def test_staging_cache_is_shared_between_two_mappings_of_the_file() -> None:
    cache = strided_cache((0, 1, 2, 3))
    desc = descriptor_from_cache(cache, backend="CPU_ATTN", isa="vec", num_layers=3, num_kv_heads=H)
    path = staging_path("test/staging")
    try:
        writer = open_staging(path, desc, 8, create=True)
        reader = open_staging(path, desc, 8)  # as vLLM's worker process maps it
        payload = {"kv": torch.randn(2, H, B, 2 * D)}
        writer.import_blocks(1, [6, 2], payload)
        got = reader.export_blocks(1, [6, 2])["kv"].reshape(payload["kv"].shape)
        assert torch.equal(got, payload["kv"])
        assert not reader.export_blocks(0, [6, 2])["kv"].any()  # other layers untouched
        with pytest.raises(ValueError, match="needs"):
            open_staging(path, desc, 9)
    finally:
        path.unlink(missing_ok=True)


def test_topology_checks_vllm_instances() -> None:
    spec = WorkerSpec(name="p", engine="vllm", block_size=32, vllm={"kv_cache_gib": 1})
    assert spec.kv_layout == ""  # vLLM's cache decides
    assert WorkerSpec(name="n").kv_layout == "vllm-flash"
    assert WorkerSpec(name="d", engine="vllm", block_size=32, tp=2).tp == 2  # vLLM's own TP
    with pytest.raises(ValueError, match=r"unknown vllm options \['kv_cache'\]"):
        WorkerSpec(name="p", engine="vllm", block_size=32, vllm={"kv_cache": 1})
    with pytest.raises(ValueError, match="vllm options on a native instance"):
        WorkerSpec(name="p", vllm={"kv_cache_gib": 1})


@pytest.mark.skipif(
    vllm_missing_reason() is not None,
    reason=f"the vllm extra is not installed: {vllm_missing_reason()}",
)
@pytest.mark.parametrize(
    ("block_size", "head_dim", "reason"),
    [
        (16, 32, "block size multiple of 32, not 16"),
        (32, 16, "head_dim in"),
    ],
)
def test_vllm_cpu_refuses_at_start_up_what_it_would_fail_on_later(
    tiny_llama: Path, tmp_path: Path, block_size: int, head_dim: int, reason: str
) -> None:
    from services.backends.vllm.engine_args import check_model

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config["head_dim"] = head_dim
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=reason):
        check_model(WorkerSettings(model=str(model), engine="vllm", block_size=block_size))
