"""One prefill or decode entry against its engine, its layout and its model: layout, block
size, dtype, tensor parallel size, vLLM's platform rules, device. Predicts the KV descriptor
the instance will announce (rank 0's), which the pair check compares as the scheduler does."""

from __future__ import annotations

from proto.kv_descriptor import KVDescriptor
from proto.layout_registry import LAYOUTS
from proto.layout_spec import DTYPE_SIZES, LayoutSpec
from services.backends.vllm import platform_rules
from services.backends.vllm.platform_rules import VllmPlatform
from services.cli.preflight.report import PlannedWorker, Report
from services.cli.topology import WorkerSpec, worker_instance_id
from services.hf.config import ModelConfig

_KNOWN_LAYOUTS = ", ".join(sorted(LAYOUTS))
NATIVE_DEFAULT_LAYOUT = "vllm-flash"  # a native instance's kv_layout when it names none


class VllmProbe:
    """vLLM's platform, asked once and only when a topology has a vLLM instance."""

    def __init__(self) -> None:
        self._asked = False
        self.platform: VllmPlatform | None = None
        self.missing = ""

    def get(self) -> VllmPlatform | None:
        if not self._asked:
            self._asked = True
            try:
                self.platform = platform_rules.current_platform()
            except ImportError as exc:
                self.missing = f"vLLM is not installed ({exc})"
        return self.platform


def tp_misfits(cfg: ModelConfig, tp: int) -> list[str]:
    """What of the model tensor parallel size `tp` cannot split: attention heads and the MLP
    evenly, KV heads evenly or, when tp exceeds them, replicated (vLLM's rule,
    proto.kv_descriptor.kv_heads_of_rank)."""
    kv = cfg.num_kv_heads
    out = []
    if cfg.num_heads % tp:
        out.append(f"{cfg.num_heads} attention heads")
    if (kv % tp if tp <= kv else tp % kv) != 0:
        out.append(f"{kv} KV heads" + (" (tp above them must be a multiple)" if tp > kv else ""))
    if cfg.intermediate_size % tp:
        out.append(f"MLP of {cfg.intermediate_size}")
    return out


def valid_tp_sizes(cfg: ModelConfig) -> list[int]:
    return [tp for tp in range(1, cfg.num_heads + 1) if not tp_misfits(cfg, tp)]


class WorkerCheck:
    """The problems of one entry; at most one per field (the first is the one to fix)."""

    def __init__(self, spec: WorkerSpec, field: str, model_field: str, report: Report):
        self.spec = spec
        self.field = field
        self.model_field = model_field
        self.report = report
        self.faulty: set[str] = set()

    def refuse(self, name: str, problem: str, fix: str) -> None:
        if name in self.faulty:
            return
        self.faulty.add(name)
        where = self.model_field if name == "model" else f"{self.field}.{name}"
        self.report.refuse(where, f"{self.spec.name}: {problem}", fix)

    def layout(self, name: str) -> LayoutSpec | None:
        if name not in LAYOUTS:
            self.refuse(
                "kv_layout",
                f"unknown KV layout {name!r}",
                f"use one of: {_KNOWN_LAYOUTS} (`hetserve layouts` describes them)",
            )
            return None
        return LAYOUTS[name]

    def native_layout(self) -> LayoutSpec | None:
        # "" is the settings' default layout, as WorkerSettings resolves it
        return self.layout(self.spec.kv_layout or NATIVE_DEFAULT_LAYOUT)

    def vllm_layout(self, probe: VllmProbe, cfg: ModelConfig | None) -> str | None:
        """The layout vLLM will allocate (None: not predictable), after vLLM's own rules."""
        spec = self.spec
        platform = probe.get()
        if platform is None:
            self.refuse("engine", probe.missing, "pip install -e .[vllm], or use engine: native")
            return None
        if cfg is not None:
            for refusal in platform_rules.refusals(
                platform, head_dim=cfg.head_dim, block_size=spec.block_size, dtype=spec.dtype
            ):
                self.refuse(refusal.field, refusal.reason, refusal.fix)
            limit = cfg.max_position_embeddings
            if spec.max_model_len > limit:
                self.refuse(
                    "max_model_len",
                    f"vLLM refuses max_model_len {spec.max_model_len} above the model's "
                    f"max_position_embeddings {limit}",
                    f"set max_model_len to at most {limit} (0: the model's)",
                )
        predicted = platform.kv_layout
        if spec.kv_layout:
            if self.layout(spec.kv_layout) is None:
                return None
            if predicted and spec.kv_layout != predicted:
                self.refuse(
                    "kv_layout",
                    f"vLLM on {platform.device} allocates {predicted}, not {spec.kv_layout}",
                    f"leave kv_layout out (vLLM's cache decides) or set it to {predicted}",
                )
                return None
        return spec.kv_layout or predicted

    def fits_layout(self, layout: LayoutSpec) -> None:
        spec = self.spec
        if spec.block_size not in layout.block_sizes:
            sizes = ", ".join(map(str, layout.block_sizes))
            self.refuse(
                "block_size",
                f"layout {layout.name} takes block sizes {sizes}, not {spec.block_size}",
                f"set block_size to {sizes}"
                if len(layout.block_sizes) == 1
                else f"set block_size to one of {sizes}",
            )
        if spec.dtype not in DTYPE_SIZES:
            self.refuse(
                "dtype",
                f"unknown dtype {spec.dtype!r}",
                f"set dtype to one of {', '.join(layout.dtypes)}",
            )
        elif spec.dtype not in layout.dtypes:
            self.refuse(
                "dtype",
                f"layout {layout.name} does not store {spec.dtype}",
                f"set dtype to one of {', '.join(layout.dtypes)}",
            )

    def fits_model(self, cfg: ModelConfig) -> None:
        tp = self.spec.tp
        misfits = tp_misfits(cfg, tp)
        if misfits:
            self.refuse(
                "tp",
                f"tp {tp} does not split the model's {', '.join(misfits)}",
                f"use tp {', '.join(map(str, valid_tp_sizes(cfg)))}",
            )

    def device(self) -> None:
        device = self.spec.device
        if not device or device == "cpu":
            return
        import torch  # only for an explicit device: it takes seconds to import

        try:
            wanted = torch.device(device)
        except RuntimeError as exc:
            self.refuse(
                "device",
                f"device {device!r} is not one torch knows ({exc})",
                "use cpu, cuda or cuda:N",
            )
            return
        if wanted.type == "cuda":
            count = torch.cuda.device_count()
            if count == 0 or (wanted.index is not None and wanted.index >= count):
                self.refuse(
                    "device",
                    f"device {device} but this machine has {count} CUDA device(s)",
                    "use cpu, or leave device out (cuda when present, else cpu)",
                )

    def descriptor(self, layout: str, cfg: ModelConfig) -> KVDescriptor | None:
        """Rank 0's descriptor, when nothing above was refused; its own checks too."""
        if self.faulty:
            return None
        try:
            return KVDescriptor(
                layout=layout,
                block_size=self.spec.block_size,
                dtype=self.spec.dtype,
                num_layers=cfg.num_layers,
                num_kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim,
                tp_size=self.spec.tp,
            )
        except ValueError as exc:
            self.refuse("kv_layout", str(exc), "choose another kv_layout for this model")
            return None


def check_worker(
    spec: WorkerSpec,
    role: str,
    index: int,
    cfg: ModelConfig | None,
    model_field: str,
    probe: VllmProbe,
    report: Report,
) -> PlannedWorker:
    field = f"{role}[{index}]"
    check = WorkerCheck(spec, field, model_field, report)
    if spec.engine == "vllm":
        layout_name = check.vllm_layout(probe, cfg)
    else:
        layout = check.native_layout()
        layout_name = layout.name if layout else None
        check.device()
    if layout_name is not None and layout_name in LAYOUTS:
        check.fits_layout(LAYOUTS[layout_name])
    if cfg is not None:
        check.fits_model(cfg)
    kv = check.descriptor(layout_name, cfg) if layout_name and cfg else None
    return PlannedWorker(
        field=field,
        role=role,
        name=spec.name,
        instance_ids=[worker_instance_id(spec, i) for i in range(spec.replicas)],
        engine=spec.engine,
        tp=spec.tp,
        kv=kv,
    )
