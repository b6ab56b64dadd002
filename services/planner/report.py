"""A plan report as a readable table or as JSON."""

from __future__ import annotations

from typing import Any

from services.planner.outcome import Outcome, PoolSummary, cost_per_million_tokens
from services.planner.planner import JOINT_SEARCH, NOT_SIMULATED, PlanReport, is_candidate
from services.planner.search import kv_bytes_per_request
from services.planner.topology import role_name, topology

_ROLE_ORDER = {"prefill": 0, "colocated": 1, "decode": 2}


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _ratio(report: PlanReport, baseline: Outcome) -> float | None:
    """How much better the plan is: baseline cost / plan cost, or plan goodput / baseline's."""
    plan = report.plan
    if not (plan.feasible and baseline.feasible):
        return None
    if report.inputs.objective == "max_goodput":
        return plan.served_rate / baseline.served_rate if baseline.served_rate else None
    if not plan.cost_per_hour or baseline.cost_per_hour is None:
        return None
    return baseline.cost_per_hour / plan.cost_per_hour


def _pool_json(pool: PoolSummary) -> dict[str, Any]:
    predicted = "predicted_ttft_s" if pool.role == "prefill" else "predicted_tpot_s"
    return {
        "role": role_name(pool.role),
        "gpu": pool.gpu,
        "tp": pool.tp,
        "pp": pool.pp,
        "instances": pool.instances,
        "gpus": pool.gpus,
        "cost_per_hour": pool.cost_per_hour,
        "rate_per_instance": pool.rate_per_instance,
        "load": pool.load,
        "utilisation": pool.utilisation,
        "limit": pool.limit,
        predicted: pool.predicted_s,
        "speed": pool.speed.as_dict(),
    }


def _busy(busy: dict[str, float]) -> dict[str, float]:
    return {role_name(role): share for role, share in busy.items()}


def _predicted(report: PlanReport, outcome: Outcome) -> dict[str, Any] | None:
    sim = outcome.simulated
    if sim is None:
        return None
    return {
        "percentile": report.inputs.slo.percentile,
        "ttft_s": sim.ttft_s,
        "tpot_s": sim.tpot_s,
        "attainment": sim.attainment,
        "meets_slo": sim.meets_slo,
        "busy": _busy(sim.busy),
        "simulated_requests": report.inputs.simulation.requests,
    }


def to_json(report: PlanReport) -> dict[str, Any]:
    inputs, plan = report.inputs, report.plan
    per_request = kv_bytes_per_request(inputs)
    return {
        "feasible": plan.feasible,
        "reason": plan.reason or None,
        "objective": inputs.objective,
        "model": inputs.model.name,
        "workload": {
            "rate": inputs.mix.rate,
            "mean_prompt_tokens": inputs.mix.mean_prompt,
            "mean_output_tokens": inputs.mix.mean_output,
        },
        "slo": inputs.slo.model_dump(),
        "cost_per_hour": plan.cost_per_hour,
        "cost_per_million_tokens": cost_per_million_tokens(inputs, plan),
        "served_rate": plan.served_rate,
        "plan_from": report.chosen,
        "prefill": [_pool_json(p) for p in plan.pools if p.role == "prefill"],
        "decode": [_pool_json(p) for p in plan.pools if p.role == "decode"],
        "both": [_pool_json(p) for p in plan.pools if p.role == "colocated"],
        "kv_paths": [
            {
                "from": a,
                "to": b,
                "requests_per_s": rate,
                "gbps": rate * per_request * 8 / 1e9,
                "capacity_gbps": inputs.link_gbps[(a, b)],
            }
            for a, b, rate in plan.kv_paths
        ],
        "predicted": _predicted(report, plan),
        "baselines": {
            b.name: {
                "feasible": b.feasible,
                "cost_per_hour": b.cost_per_hour,
                "served_rate": b.served_rate,
                "ratio": _ratio(report, b),
                "simulated": b.simulated is not None,
                "attainment": b.simulated.attainment if b.simulated else None,
                "meets_slo": b.simulated.meets_slo if b.simulated else None,
                "pools": [
                    {
                        "role": role_name(p.role),
                        "gpu": p.gpu,
                        "tp": p.tp,
                        "pp": p.pp,
                        "instances": p.instances,
                    }
                    for p in b.pools
                ],
                "reason": b.reason or None,
                "candidate": is_candidate(inputs, b),
                "notes": list(b.notes),
            }
            for b in report.baselines
        },
        "topology": topology(plan, inputs.model.name) if plan.feasible else None,
        "notes": list(plan.notes),
        "timing_s": report.seconds,
    }


def _header(report: PlanReport) -> str:
    inputs = report.inputs
    slo, mix = inputs.slo, inputs.mix
    rate = f"{mix.rate:g} req/s" if mix.rate is not None else f"budget {inputs.budget_per_hour:g}/h"
    return (
        f"model {inputs.model.name}, {rate}, prompt ~{mix.mean_prompt:.0f} / output "
        f"~{mix.mean_output:.0f} tokens; SLO p{slo.percentile:g} TTFT <= {slo.ttft_s:g} s, "
        f"TPOT <= {slo.tpot_s:g} s, attainment >= {slo.attainment:.0%}"
    )


def to_table(report: PlanReport) -> str:
    inputs, plan = report.inputs, report.plan
    out = [_header(report)]
    if not plan.feasible:
        out.append(f"no feasible plan: {plan.reason}")
        return "\n".join(out)
    per_million = cost_per_million_tokens(inputs, plan)
    source = "" if report.chosen == JOINT_SEARCH else f" (the {report.chosen} baseline)"
    out.append(
        f"cost {_money(plan.cost_per_hour)} per hour, {_figure(per_million)} per million tokens, "
        f"serving {plan.served_rate:.3g} req/s{source}"
    )
    rows = []
    for p in sorted(plan.pools, key=lambda p: (_ROLE_ORDER.get(p.role, 3), p.gpu)):
        metric = "TTFT" if p.role == "prefill" else "TPOT"
        predicted = "-" if p.predicted_s is None else f"{metric} {p.predicted_s:.3g} s"
        rows.append(
            [
                role_name(p.role),
                p.gpu,
                str(p.tp),
                str(p.pp),
                str(p.instances),
                str(p.gpus),
                _money(p.cost_per_hour),
                f"{p.rate_per_instance:.3g}",
                f"{p.load:.3g}",
                f"{p.utilisation:.0%}",
                predicted,
                p.limit,
            ]
        )
    headers = [
        "phase",
        "gpu",
        "tp",
        "pp",
        "inst",
        "gpus",
        "$/h",
        "req/s/inst",
        "load",
        "util",
        "estimate",
        "limit",
    ]
    out += ["", _table(headers, rows)]
    per_request = kv_bytes_per_request(inputs)
    for a, b, rate in plan.kv_paths:
        used = rate * per_request * 8 / 1e9
        out.append(
            f"KV {a} -> {b}: {rate:.3g} req/s, {used:.3g} of {inputs.link_gbps[(a, b)]:g} Gbit/s"
        )
    sim = plan.simulated
    if sim is not None:
        verdict = "meets the SLO" if sim.meets_slo else "MISSES the SLO"
        busy = ", ".join(f"{role} {share:.0%}" for role, share in _busy(sim.busy).items())
        out.append(
            f"simulated ({inputs.simulation.requests} requests): TTFT p{inputs.slo.percentile:g} "
            f"{sim.ttft_s:.3g} s, TPOT p{inputs.slo.percentile:g} {sim.tpot_s:.3g} s, attainment "
            f"{sim.attainment:.1%}: {verdict}; busy {busy}"
        )
    if report.baselines:
        ratio_label = "goodput x" if inputs.objective == "max_goodput" else "cost x"
        rows = []
        for b in report.baselines:
            ratio = _ratio(report, b)
            attained = "-" if b.simulated is None else f"{b.simulated.attainment:.1%}"
            if NOT_SIMULATED in b.notes:
                attained = "not simulated"
            rows.append(
                [
                    b.name if is_candidate(inputs, b) else f"{b.name} (not a candidate)",
                    "yes" if b.feasible else "no",
                    _money(b.cost_per_hour),
                    "-" if ratio is None else f"{ratio:.2f}",
                    attained,
                    b.reason,
                ]
            )
        out += [
            "",
            _table(["baseline", "feasible", "$/h", ratio_label, "attainment", "why not"], rows),
        ]
    if any(NOT_SIMULATED in b.notes for b in report.baselines):
        out.append(f"not simulated: {NOT_SIMULATED.removeprefix('not simulated: ')}")
    for note in plan.notes:
        out.append(f"note: {note}")
    return "\n".join(out)
