"""Instance ids: every process that announces itself needs its own, and a valid subject token.

Two entries that share a name (a prefill and a decode both called vllm-tp1) would both be
vllm-tp1-0: one registry key, one set of subjects, each heartbeat overwriting the other, so
the gateway never sees both roles live.
"""

from __future__ import annotations

from proto.subjects import check_token
from services.cli.preflight.report import Report
from services.cli.topology import Topology, worker_instance_id

WORKER_ROLES = ("prefill", "decode", "both")  # the topology's lists of workers


def instance_ids(topology: Topology) -> list[tuple[str, str, str]]:
    """(instance id, the topology field it comes from, whose it is) for every instance
    `hetserve up` starts, named as the launcher names them; workers last, so a clash is
    reported at the worker's name."""
    out: list[tuple[str, str, str]] = []
    for role in ("scheduler", "converter", "gateway"):
        replicas = getattr(topology, role).replicas
        out += [(f"{role}-{i}", f"{role}.replicas", f"the {role}") for i in range(replicas)]
    for role in WORKER_ROLES:
        for index, spec in enumerate(getattr(topology, role)):
            field = f"{role}[{index}].name"
            owner = f"{role}[{index}] ({spec.name})"
            out += [(worker_instance_id(spec, i), field, owner) for i in range(spec.replicas)]
    return out


def check_names(topology: Topology, report: Report) -> None:
    for role in WORKER_ROLES:
        for index, spec in enumerate(getattr(topology, role)):
            try:
                check_token(spec.name, "name")
            except ValueError as exc:
                report.refuse(
                    f"{role}[{index}].name",
                    str(exc),
                    "use letters, digits, - and _ only (the name is part of NATS subjects)",
                )
    owners: dict[str, str] = {}
    for instance_id, field, owner in instance_ids(topology):
        if instance_id not in owners:
            owners[instance_id] = owner
            continue
        report.refuse(
            field,
            f"instance id {instance_id} clashes with {owners[instance_id]}: the two would "
            "share one registry entry and the system would never become healthy",
            "give every prefill, decode and both entry a name of its own",
        )
