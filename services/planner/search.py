"""Enumerate instance shapes per GPU type and role, and what each sustains under the SLO.

Roles: prefill and decode (disaggregated) and colocated (one instance runs both phases, as an
engine without P/D does). The plan searches all three together; the baselines are
restrictions of that one search (`restricted`)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from services.planner.capacity import (
    Capacity,
    PhaseTargets,
    colocated_capacity,
    decode_capacity,
    prefill_capacity,
)
from services.planner.inputs import PlanInputs
from services.planner.perf_model import InstanceShape, PerfModel
from services.planner.problem import CapacityProblem, Config

Mode = Literal["all", "disaggregated", "colocated"]


@dataclass(frozen=True)
class Rejection:
    """A shape left out (role "memory": it fits no request) or a (shape, role) that meets no
    load; `unloaded_s` is its zero-load TTFT or single-sequence TPOT when that is the cause."""

    role: str
    label: str
    reason: str
    unloaded_s: float | None = None


@dataclass(frozen=True)
class SearchResult:
    problem: CapacityProblem
    perf: tuple[PerfModel, ...]  # per configuration, same order as problem.configs
    limits: tuple[str, ...]  # per configuration: what bounds its rate
    rejected: tuple[Rejection, ...]
    shapes_tried: int

    def restricted(self, roles: Collection[str], gpu: str | None = None) -> SearchResult:
        """The configurations of `roles` (on `gpu` alone when given): a baseline's search
        space. Rejections of those roles stay, to say why a restriction has no plan."""
        chosen = [
            i
            for i, c in enumerate(self.problem.configs)
            if c.role in roles and (gpu is None or c.gpu == gpu)
        ]
        return SearchResult(
            problem=self.problem.restricted(chosen),
            perf=tuple(self.perf[i] for i in chosen),
            limits=tuple(self.limits[i] for i in chosen),
            rejected=tuple(r for r in self.rejected if r.role in roles or r.role == "memory"),
            shapes_tried=self.shapes_tried,
        )


def targets_of(inputs: PlanInputs) -> PhaseTargets:
    return PhaseTargets(
        ttft_s=inputs.slo.ttft_s,
        tpot_s=inputs.slo.tpot_s,
        level=inputs.level,
        max_batch=inputs.search.max_batch,
        max_prefill_tokens=inputs.search.max_prefill_tokens,
        memory_utilisation=inputs.search.gpu_memory_utilisation,
    )


def kv_bytes_per_request(inputs: PlanInputs) -> float:
    return inputs.mix.mean_prompt * inputs.model.kv_bytes_per_token


def link_rates(inputs: PlanInputs) -> dict[tuple[str, str], float]:
    """Requests/s each (prefill type, decode type) KV path carries at its utilisation cap."""
    per_request = kv_bytes_per_request(inputs)
    usable = inputs.max_link_utilisation * 1e9 / 8
    return {pair: gbps * usable / per_request for pair, gbps in inputs.link_gbps.items()}


def _shapes(inputs: PlanInputs, gpu_types: list[str]) -> tuple[list[PerfModel], list[Rejection]]:
    """Every (tp, pp) of the search space that fits the type's node, count and memory."""
    model, search = inputs.model, inputs.search
    fitting: list[PerfModel] = []
    rejected: list[Rejection] = []
    need = inputs.mix.prompt.largest
    for name in gpu_types:
        gpu = inputs.gpus[name]
        for tp in sorted(set(search.tp)):
            for pp in sorted(set(search.pp)):
                shape = InstanceShape(gpu, tp, pp)
                if tp > gpu.gpus_per_node or model.num_heads % tp or pp > model.num_layers:
                    continue  # not a legal shape for this node or model
                if shape.gpus > inputs.counts[name]:
                    continue
                perf = PerfModel(model, shape, inputs.link_gbps[(name, name)])
                tokens = perf.kv_capacity_tokens(
                    search.gpu_memory_utilisation, search.max_prefill_tokens
                )
                if tokens < need:
                    per_gpu = (
                        perf.weight_bytes_per_gpu()
                        + perf.activation_bytes_per_gpu(search.max_prefill_tokens)
                    ) / 1e9
                    usable = gpu.memory_gb * search.gpu_memory_utilisation
                    reason = (
                        f"weights and activations take {per_gpu:.1f} GB of {usable:.1f} GB "
                        f"usable per GPU, leaving KV room for {tokens} tokens "
                        f"(a {need}-token prompt needs more)"
                    )
                    rejected.append(Rejection("memory", shape.label(), reason))
                    continue
                fitting.append(perf)
    return fitting, rejected


def build_problem(inputs: PlanInputs, mode: Mode = "disaggregated") -> SearchResult:
    """Every configuration of the inventory's GPU types for `mode`'s roles, with its rate."""
    types = list(inputs.gpus)
    targets = targets_of(inputs)
    shapes, rejected = _shapes(inputs, types)
    configs: list[Config] = []
    perfs: list[PerfModel] = []
    limits: list[str] = []

    def add(config: Config, perf: PerfModel, capacity: Capacity) -> None:
        if config.best_rate() > 0:
            configs.append(config)
            perfs.append(perf)
            limits.append(capacity.reason)
        else:
            label = f"{config.gpu} tp={config.tp} pp={config.pp}"
            rejected.append(Rejection(config.role, label, capacity.reason, capacity.unloaded_s))

    for perf in shapes:
        shape = perf.shape
        name = shape.gpu.name
        price = inputs.prices[name] * shape.gpus
        common = {"gpu": name, "tp": shape.tp, "pp": shape.pp, "price_per_hour": price}
        if mode != "disaggregated":
            capacity = colocated_capacity(perf, inputs.mix, targets)
            add(Config(role="colocated", rate=capacity.rate, **common), perf, capacity)
        if mode == "colocated":
            continue
        by_bandwidth: dict[float, Capacity] = {}
        for destination in types:
            bandwidth = inputs.link_gbps[(name, destination)]
            if bandwidth not in by_bandwidth:
                by_bandwidth[bandwidth] = prefill_capacity(perf, inputs.mix, targets, bandwidth)
        rate_to = {d: by_bandwidth[inputs.link_gbps[(name, d)]].rate for d in types}
        fastest = max(by_bandwidth.values(), key=lambda c: c.rate)
        add(Config(role="prefill", rate_to=rate_to, **common), perf, fastest)
        capacity = decode_capacity(perf, inputs.mix, targets)
        add(Config(role="decode", rate=capacity.rate, **common), perf, capacity)
    problem = CapacityProblem(
        configs=tuple(configs),
        inventory={name: inputs.counts[name] for name in types},
        link_rate=link_rates(inputs),
        demand=inputs.mix.rate if inputs.objective == "min_cost" else None,
        budget=inputs.budget_per_hour if inputs.objective == "max_goodput" else None,
    )
    return SearchResult(problem, tuple(perfs), tuple(limits), tuple(rejected), len(shapes))
