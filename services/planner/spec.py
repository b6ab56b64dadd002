"""The plan spec: one YAML or JSON file with sections model, gpus, inventory, network, workload,
slo, objective (and optional search, simulation, profiles), validated with precise messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from services.planner.catalog import Efficiency
from services.planner.errors import PlannerError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelRef(_Strict):
    """A built-in model name, or a Hugging Face config.json (file or directory)."""

    name: str | None = None
    config: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelRef:
        if (self.name is None) == (self.config is None):
            raise ValueError("give exactly one of name (a built-in model) or config (a path)")
        return self


class GpuOverride(_Strict):
    """Adds a GPU type to the catalog, or replaces some figures of a built-in one."""

    name: str = Field(min_length=1)
    vendor: str | None = None
    tflops_bf16: float | None = Field(None, gt=0)
    dense: bool | None = None
    hbm_gbps: float | None = Field(None, gt=0)
    memory_gb: float | None = Field(None, gt=0)
    link_gbps: float | None = Field(None, gt=0)
    gpus_per_node: int | None = Field(None, ge=1)
    source: str | None = None
    note: str | None = None
    efficiency: Efficiency | None = None


class InventoryItem(_Strict):
    gpu: str = Field(min_length=1)
    count: int = Field(ge=1)
    price_per_hour: float = Field(gt=0, description="per GPU")


class LinkBandwidth(_Strict):
    source: str = Field(alias="from", min_length=1)
    destination: str = Field(alias="to", min_length=1)
    gbps: float = Field(gt=0, description="gigabits per second")


class Network(_Strict):
    """KV paths between pools, in gigabits per second (as NICs are rated)."""

    inter_pool_gbps: float = Field(gt=0, description="between pools of different GPU types")
    intra_pool_gbps: float = Field(400.0, gt=0, description="prefill to decode of one type")
    links: tuple[LinkBandwidth, ...] = ()
    max_link_utilisation: float = Field(0.8, gt=0, le=1)


class LengthDistribution(_Strict):
    """Token counts: fixed at the mean, or exponential / uniform on [1, 2 mean - 1] /
    lognormal (with coefficient of variation `cv`), clipped to `max`."""

    mean: float = Field(ge=1)
    distribution: Literal["fixed", "exponential", "uniform", "lognormal"] = "fixed"
    cv: float = Field(0.5, gt=0)
    max: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _max_above_mean(self) -> LengthDistribution:
        if self.max is not None and self.max < self.mean:
            raise ValueError(f"max ({self.max}) is below mean ({self.mean})")
        return self


class Workload(_Strict):
    """Poisson arrivals at `rate` (requests/s); lengths from distributions or a JSONL trace
    whose lines hold prompt_tokens and output_tokens (and optionally arrival_s)."""

    rate: float | None = Field(None, gt=0)
    prompt_tokens: LengthDistribution | None = None
    output_tokens: LengthDistribution | None = None
    trace: Path | None = None

    @model_validator(mode="after")
    def _lengths_given(self) -> Workload:
        if self.trace is None and (self.prompt_tokens is None or self.output_tokens is None):
            raise ValueError("give prompt_tokens and output_tokens, or a trace")
        if self.trace is not None and (self.prompt_tokens or self.output_tokens):
            raise ValueError("give either a trace or length distributions, not both")
        if self.output_tokens is not None and self.output_tokens.mean < 2:
            raise ValueError("output_tokens.mean must be >= 2: one output token needs no decode")
        return self


class Slo(_Strict):
    ttft_s: float = Field(gt=0)
    tpot_s: float = Field(gt=0)
    percentile: float = Field(90.0, gt=0, lt=100)
    attainment: float = Field(0.9, gt=0, le=1, description="share of requests meeting both")


class SearchSpace(_Strict):
    tp: tuple[int, ...] = Field((1, 2, 4, 8), min_length=1)
    pp: tuple[int, ...] = Field((1, 2, 4), min_length=1)
    max_batch: int = Field(256, ge=1, description="decode sequences per instance")
    max_prefill_tokens: int = Field(8192, ge=1, description="tokens per prefill batch")
    gpu_memory_utilisation: float = Field(0.9, gt=0, le=1)
    colocated: bool = Field(
        True,
        description="plan colocated instances (prefill and decode in one engine) too; false "
        "keeps the plan to prefill and decode pools",
    )

    @model_validator(mode="after")
    def _positive_degrees(self) -> SearchSpace:
        for label, degrees in (("tp", self.tp), ("pp", self.pp)):
            if any(degree < 1 for degree in degrees):
                raise ValueError(f"{label} degrees must be >= 1 (got {list(degrees)})")
        return self


class Simulation(_Strict):
    requests: int = Field(3000, ge=100)
    seed: int = 0
    warmup_fraction: float = Field(0.1, ge=0, lt=1)


class PlanSpec(_Strict):
    model: ModelRef
    gpus: tuple[GpuOverride, ...] = ()
    inventory: tuple[InventoryItem, ...]
    network: Network
    workload: Workload
    slo: Slo
    objective: Literal["min_cost", "max_goodput"] = "min_cost"
    budget_per_hour: float | None = Field(None, gt=0)
    search: SearchSpace = SearchSpace()
    simulation: Simulation = Simulation()
    profiles: tuple[Path, ...] = ()

    @field_validator("inventory")
    @classmethod
    def _some_inventory(cls, inventory: tuple[InventoryItem, ...]) -> tuple[InventoryItem, ...]:
        if not inventory:
            raise ValueError("is empty: list at least one GPU type with its count and price")
        return inventory

    @model_validator(mode="before")
    @classmethod
    def _model_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            return {**data, "model": {"name": data["model"]}}
        return data

    @model_validator(mode="after")
    def _objective_inputs(self) -> PlanSpec:
        if self.objective == "max_goodput" and self.budget_per_hour is None:
            raise ValueError("objective max_goodput needs budget_per_hour")
        if (
            self.objective == "min_cost"
            and self.workload.rate is None
            and self.workload.trace is None
        ):
            raise ValueError("objective min_cost needs workload.rate (requests per second)")
        names = [item.gpu for item in self.inventory]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"inventory lists {', '.join(duplicates)} more than once")
        return self


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: `source: section.field: message (got value)`."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        got = item.get("input")
        shown = (
            "" if isinstance(got, dict | list) or item["type"] == "missing" else f" (got {got!r})"
        )
        lines.append(f"{source}: {where}: {message}{shown}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "spec") -> PlanSpec:
    if not isinstance(data, dict):
        raise PlannerError(f"{source}: must be a mapping with sections model, inventory, ...")
    try:
        return PlanSpec.model_validate(data)
    except ValidationError as exc:
        raise PlannerError(format_validation_error(exc, source)) from None


def load_spec(path: Path) -> PlanSpec:
    """Read and validate a spec; relative paths inside it are relative to its directory."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlannerError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise PlannerError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from None
    spec = parse_spec(data, str(path))
    return _rebase_paths(spec, path.parent)


def _rebase_paths(spec: PlanSpec, base: Path) -> PlanSpec:
    def rebase(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    model = spec.model.model_copy(update={"config": rebase(spec.model.config)})
    workload = spec.workload.model_copy(update={"trace": rebase(spec.workload.trace)})
    profiles = tuple(rebase(p) or p for p in spec.profiles)
    return spec.model_copy(update={"model": model, "workload": workload, "profiles": profiles})
