"""Resolve a validated spec into what the search needs: model, catalog, inventory, links."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from pydantic import ValidationError

from services.planner.catalog import GpuSpec, builtin_catalog
from services.planner.errors import PlannerError
from services.planner.model_spec import ModelSpec, builtin_model, model_from_hf_config
from services.planner.profiles import load_profile
from services.planner.spec import GpuOverride, PlanSpec, SearchSpace, Simulation, Slo
from services.planner.workload import RequestMix, resolve_workload


@dataclass(frozen=True)
class PlanInputs:
    model: ModelSpec
    gpus: dict[str, GpuSpec]  # the inventory's types, in inventory order
    counts: dict[str, int]
    prices: dict[str, float]  # per GPU-hour
    link_gbps: dict[tuple[str, str], float]  # (prefill type, decode type) -> gigabits/s
    max_link_utilisation: float
    mix: RequestMix
    slo: Slo
    search: SearchSpace
    simulation: Simulation
    objective: str
    budget_per_hour: float | None

    @property
    def level(self) -> float:
        """Share of requests each phase must serve within its target: the SLO percentile,
        raised so that two independent phases together reach the attainment goal."""
        return max(self.slo.percentile / 100, self.slo.attainment**0.5)

    def with_rate(self, rate: float) -> PlanInputs:
        return replace(self, mix=self.mix.with_rate(rate))


def unknown_gpu_message(where: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{where}: unknown GPU '{name}'{hint} (known: {', '.join(sorted(known))})"


def merge_catalog(
    overrides: tuple[GpuOverride, ...], base: dict[str, GpuSpec]
) -> dict[str, GpuSpec]:
    catalog = dict(base)
    for index, override in enumerate(overrides):
        given = override.model_dump(exclude_none=True)
        if override.name in catalog:
            merged = {**catalog[override.name].model_dump(), **given}
        else:
            merged = given
        try:
            catalog[override.name] = GpuSpec.model_validate(merged)
        except ValidationError as exc:
            missing = [str(e["loc"][0]) for e in exc.errors() if e["type"] == "missing"]
            detail = f"a new GPU type needs {', '.join(missing)}" if missing else str(exc)
            raise PlannerError(f"gpus[{index}] ({override.name}): {detail}") from None
    return catalog


def resolve(spec: PlanSpec) -> PlanInputs:
    catalog = builtin_catalog()
    for path in spec.profiles:
        profile = load_profile(path)
        catalog[profile.gpu.name] = profile.gpu
    catalog = merge_catalog(spec.gpus, catalog)
    known = list(catalog)
    for index, item in enumerate(spec.inventory):
        if item.gpu not in catalog:
            raise PlannerError(unknown_gpu_message(f"inventory[{index}].gpu", item.gpu, known))
    types = [item.gpu for item in spec.inventory]
    links = {
        (a, b): spec.network.intra_pool_gbps if a == b else spec.network.inter_pool_gbps
        for a in types
        for b in types
    }
    for index, link in enumerate(spec.network.links):
        for end, name in (("from", link.source), ("to", link.destination)):
            if name not in types:
                raise PlannerError(
                    f"network.links[{index}].{end}: '{name}' is not in the inventory "
                    f"({', '.join(types)})"
                )
        links[(link.source, link.destination)] = link.gbps
    if spec.model.config is not None:
        model = model_from_hf_config(spec.model.config)
    else:
        model = builtin_model(spec.model.name or "")
    mix = resolve_workload(spec.workload)
    if spec.objective == "min_cost" and mix.rate is None:
        raise PlannerError("workload.rate: min_cost needs an arrival rate (requests per second)")
    return PlanInputs(
        model=model,
        gpus={name: catalog[name] for name in types},
        counts={item.gpu: item.count for item in spec.inventory},
        prices={item.gpu: item.price_per_hour for item in spec.inventory},
        link_gbps=links,
        max_link_utilisation=spec.network.max_link_utilisation,
        mix=mix,
        slo=spec.slo,
        search=spec.search,
        simulation=spec.simulation,
        objective=spec.objective,
        budget_per_hour=spec.budget_per_hour,
    )
