"""Say precisely why a spec has no plan: memory, an SLO nothing meets, or too little inventory."""

from __future__ import annotations

from dataclasses import replace

from services.planner.inputs import PlanInputs
from services.planner.milp import solve_milp
from services.planner.problem import Allocation
from services.planner.search import Rejection, SearchResult

_LISTED = 4  # rejections quoted per cause


def _quote(rejections: list[Rejection]) -> str:
    ranked = sorted(rejections, key=lambda r: (r.unloaded_s is None, r.unloaded_s or 0.0))
    lines = [f"  {r.label}: {r.reason}" for r in ranked[:_LISTED]]
    if len(ranked) > _LISTED:
        lines.append(f"  ... and {len(ranked) - _LISTED} more")
    return "\n".join(lines)


def _no_configuration(inputs: PlanInputs, search: SearchResult, role: str) -> str:
    slo, level = inputs.slo, inputs.level
    target = f"TTFT <= {slo.ttft_s:g} s" if role == "prefill" else f"TPOT <= {slo.tpot_s:g} s"
    if role == "colocated":
        target = f"TTFT <= {slo.ttft_s:g} s and TPOT <= {slo.tpot_s:g} s on shared GPUs"
    failing = [r for r in search.rejected if r.role == role]
    head = f"no {role} configuration meets {target} for {level:.1%} of requests"
    return f"{head}; the closest:\n{_quote(failing)}" if failing else head


def explain_infeasible(
    inputs: PlanInputs,
    search: SearchResult,
    roles: tuple[str, ...] = ("prefill", "decode", "colocated"),
) -> str:
    """Why `search.problem`, over instances of `roles`, has no solution: the first cause that
    applies, in that order."""
    model = inputs.model
    present = {c.role for c in search.problem.configs}
    if search.shapes_tried == 0:
        weights = model.weight_bytes / 1e9
        inventory = ", ".join(
            f"{n} x {g} ({inputs.gpus[g].memory_gb:g} GB)" for g, n in inputs.counts.items()
        )
        memory = [r for r in search.rejected if r.role == "memory"]
        detail = f":\n{_quote(memory)}" if memory else " (no tensor/pipeline degree is legal)"
        return (
            f"model {model.name} ({weights:.1f} GB of weights) fits on no instance shape the "
            f"inventory allows [{inventory}]{detail}"
        )
    split = [role for role in ("prefill", "decode") if role in roles]
    split_missing = [role for role in split if role not in present]
    colocated_missing = "colocated" in roles and "colocated" not in present
    if (not split or split_missing) and ("colocated" not in roles or colocated_missing):
        missing = split_missing + (["colocated"] if colocated_missing else [])
        return "\n".join(_no_configuration(inputs, search, role) for role in missing)
    problem = search.problem
    if problem.demand is None:
        return "the budget buys no instance set that serves any request within the SLO"
    unbounded = replace(problem, demand=None, budget=None)
    most = solve_milp(unbounded)
    served = most.served if isinstance(most, Allocation) else 0.0
    message = (
        f"the inventory sustains at most {served:.3g} req/s within the SLO; "
        f"the workload asks for {problem.demand:g} req/s"
    )
    free_links = solve_milp(replace(unbounded, link_rate={}))
    if isinstance(free_links, Allocation) and free_links.served > served * 1.001:
        message += (
            f"; the KV links between pools are the limit (with unlimited links: "
            f"{free_links.served:.3g} req/s)"
        )
    return message
