"""How every prefill entry will reach every decode entry, decided as the scheduler decides
(services/scheduler/policy.py: pairable; identical descriptors go direct, others through the
converter), from the descriptors the instances will announce."""

from __future__ import annotations

from proto.messages import InstanceInfo
from services.cli.preflight.report import PlannedPair, PlannedWorker, Report, Route, describe_kv
from services.cli.topology import Topology
from services.scheduler.policy import pairable


def route_of(prefill: PlannedWorker, decode: PlannedWorker) -> Route:
    if prefill.kv is None or decode.kv is None:
        return "unknown"
    p = InstanceInfo(instance_id=prefill.name, role="prefill", kv=prefill.kv)
    d = InstanceInfo(instance_id=decode.name, role="decode", kv=decode.kv)
    if not pairable(p, d):
        return "unpairable"
    return "direct" if prefill.kv.same_kv_as(decode.kv) else "converter"


def check_pairs(topology: Topology, report: Report) -> list[PlannedPair]:
    """Every prefill entry against every decode and both entry. A decode instance with
    prefill_locally_below, and every both instance, also prefills prompts itself."""
    prefills = [w for w in report.workers if w.role == "prefill"]
    decodes = [w for w in report.workers if w.role in ("decode", "both")]
    pairs = [PlannedPair(p, d, route_of(p, d)) for p in prefills for d in decodes]
    local = bool(topology.both) or any(s.prefill_locally_below for s in topology.decode)
    if topology.converter.replicas == 0:
        for pair in pairs:
            if pair.route != "converter":
                continue
            what = (
                f"{pair.prefill.name} ({describe_kv(pair.prefill.kv)}) -> "
                f"{pair.decode.name} ({describe_kv(pair.decode.kv)}) needs the converter "
                "and there is none"
            )
            fix = (
                "set converter: {replicas: 1}, or give both the same kv_layout, "
                "block_size, dtype and tp"
            )
            if pair.decode.role == "both":  # it still serves what it prefills itself
                report.warn("converter.replicas", f"{what}: {pair.decode.name} only serves "
                            "prompts it prefills itself", fix)  # fmt: skip
            else:
                report.refuse("converter.replicas", what, fix)
    known = [pair for pair in pairs if pair.route != "unknown"]
    if not local and known and all(pair.route == "unpairable" for pair in known):
        report.refuse(
            "decode",
            "no prefill entry serves a model of the same KV geometry (layers, KV heads, "
            "head_dim) as any decode entry: no request could be placed",
            "serve the same model on both sides",
        )
        return pairs
    for decode in decodes:
        routes = {pair.route for pair in known if pair.decode is decode}
        if routes == {"unpairable"}:
            report.warn(
                decode.field,
                f"{decode.name}: no prefill entry serves its model geometry; it gets only "
                "prompts it prefills itself",
                "serve its model on a prefill entry too",
            )
    return pairs
