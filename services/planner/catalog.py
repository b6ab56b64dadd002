"""The built-in accelerator catalog: datasheet figures, each with its source.

Units: `tflops_bf16` is TFLOP/s, `hbm_gbps` and `link_gbps` are gigabytes per second (as
datasheets state memory and scale-up bandwidth; `link_gbps` is the datasheet's aggregate
bidirectional figure per device), `memory_gb` is gigabytes. `dense` says whether the TFLOP/s
figure is dense; a sparse (2:4) figure is halved before use. Efficiency factors are
uncalibrated defaults until a measured profile replaces them (see `calibrate.py`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Efficiency(BaseModel):
    """Fractions of datasheet peaks a real kernel reaches, plus a fixed per-layer cost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    compute: float = Field(0.6, gt=0, le=1, description="fraction of dense peak FLOP/s")
    memory: float = Field(0.8, gt=0, le=1, description="fraction of memory bandwidth (weights)")
    attention: float = Field(
        0.8, gt=0, le=1, description="fraction of memory bandwidth attention gets reading KV"
    )
    link: float = Field(0.7, gt=0, le=1, description="fraction of scale-up link bandwidth")
    layer_overhead_s: float = Field(
        20e-6, ge=0, description="fixed time per layer per step (launches, norms, rotary)"
    )


class GpuSpec(BaseModel):
    """One accelerator type as the performance model sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    vendor: str = Field(min_length=1)
    tflops_bf16: float = Field(gt=0)
    dense: bool
    hbm_gbps: float = Field(gt=0)
    memory_gb: float = Field(gt=0)
    link_gbps: float = Field(gt=0)
    gpus_per_node: int = Field(ge=1, description="size of the scale-up domain: the largest TP")
    source: str = Field(min_length=1)
    note: str = ""
    efficiency: Efficiency = Efficiency()

    @property
    def dense_flops(self) -> float:
        """Dense bf16 FLOP/s (a sparse datasheet figure halved)."""
        return self.tflops_bf16 * 1e12 * (1.0 if self.dense else 0.5)


_PCIE4_X16_GBPS = 64.0  # 32 GB/s each way: the only path between PCIe cards without NVLink

BUILTIN_GPUS: tuple[GpuSpec, ...] = (
    GpuSpec(
        name="h100-sxm",
        vendor="nvidia",
        tflops_bf16=989,
        dense=True,
        hbm_gbps=3350,
        memory_gb=80,
        link_gbps=900,
        gpus_per_node=8,
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM5; 1,979 TFLOP/s is with sparsity)",
    ),
    GpuSpec(
        name="h200",
        vendor="nvidia",
        tflops_bf16=989,
        dense=True,
        hbm_gbps=4800,
        memory_gb=141,
        link_gbps=900,
        gpus_per_node=8,
        source="NVIDIA H200 Tensor Core GPU datasheet (SXM; 1,979 TFLOP/s is with sparsity)",
    ),
    GpuSpec(
        name="a100-80gb",
        vendor="nvidia",
        tflops_bf16=312,
        dense=True,
        hbm_gbps=2039,
        memory_gb=80,
        link_gbps=600,
        gpus_per_node=8,
        source="NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB; 624 TFLOP/s is with sparsity)",
    ),
    GpuSpec(
        name="a100-40gb",
        vendor="nvidia",
        tflops_bf16=312,
        dense=True,
        hbm_gbps=1555,
        memory_gb=40,
        link_gbps=600,
        gpus_per_node=8,
        source="NVIDIA A100 Tensor Core GPU datasheet (SXM 40GB; 624 TFLOP/s is with sparsity)",
    ),
    GpuSpec(
        name="l40s",
        vendor="nvidia",
        tflops_bf16=362,
        dense=True,
        hbm_gbps=864,
        memory_gb=48,
        link_gbps=_PCIE4_X16_GBPS,
        gpus_per_node=8,
        source="NVIDIA L40S datasheet (362.05 dense, 733 with sparsity; GDDR6, PCIe Gen4 x16)",
    ),
    GpuSpec(
        name="a10",
        vendor="nvidia",
        tflops_bf16=125,
        dense=True,
        hbm_gbps=600,
        memory_gb=24,
        link_gbps=_PCIE4_X16_GBPS,
        gpus_per_node=4,
        source="NVIDIA A10 Tensor Core GPU datasheet (125 dense, 250 with sparsity; PCIe Gen4)",
    ),
    GpuSpec(
        name="l4",
        vendor="nvidia",
        tflops_bf16=121,
        dense=True,
        hbm_gbps=300,
        memory_gb=24,
        link_gbps=_PCIE4_X16_GBPS,
        gpus_per_node=8,
        source="NVIDIA L4 Tensor Core GPU datasheet (242 TFLOP/s with sparsity; PCIe Gen4)",
    ),
    GpuSpec(
        name="mi300x",
        vendor="amd",
        tflops_bf16=1307.4,
        dense=True,
        hbm_gbps=5300,
        memory_gb=192,
        link_gbps=896,
        gpus_per_node=8,
        source="AMD Instinct MI300X data sheet (2,614.9 TFLOP/s is with sparsity; "
        "896 GB/s peak aggregate Infinity Fabric)",
    ),
    GpuSpec(
        name="mi250x",
        vendor="amd",
        tflops_bf16=383,
        dense=True,
        hbm_gbps=3276.8,
        memory_gb=128,
        link_gbps=800,
        gpus_per_node=4,
        source="AMD Instinct MI250X data sheet (per OAM module; 8 Infinity Fabric links)",
        note="one OAM holds two dies that software sees as two 64 GB devices; modelled as one",
    ),
    GpuSpec(
        name="ascend-910b",
        vendor="huawei",
        tflops_bf16=320,
        dense=True,
        hbm_gbps=1600,
        memory_gb=64,
        link_gbps=392,
        gpus_per_node=8,
        source="Huawei Atlas 800T A2 / Ascend 910B public specifications (fp16)",
        note="approximate: SKUs 910B1-B4 range 280-376 TFLOP/s; HCCS 392 GB/s per node card",
    ),
    GpuSpec(
        name="gaudi2",
        vendor="intel",
        tflops_bf16=432,
        dense=True,
        hbm_gbps=2460,
        memory_gb=96,
        link_gbps=300,
        gpus_per_node=8,
        source="Intel Gaudi 3 AI Accelerator white paper, Gaudi 2 column (MME bf16; "
        "24x100 GbE RoCE)",
    ),
    GpuSpec(
        name="gaudi3",
        vendor="intel",
        tflops_bf16=1835,
        dense=True,
        hbm_gbps=3670,
        memory_gb=128,
        link_gbps=600,
        gpus_per_node=8,
        source="Intel Gaudi 3 AI Accelerator white paper (MME bf16; 24x200 GbE RoCE)",
    ),
)


def builtin_catalog() -> dict[str, GpuSpec]:
    """The built-in catalog keyed by name."""
    return {gpu.name: gpu for gpu in BUILTIN_GPUS}
