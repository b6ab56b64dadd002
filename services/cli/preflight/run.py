"""Every check of a topology, in order: the file, instance ids, the KV transport, model
files, each worker against its engine, layout and model, the pairs, the ports."""

from __future__ import annotations

from pathlib import Path

from services.cli.preflight.model_files import check_model_dir
from services.cli.preflight.names import WORKER_ROLES, check_names
from services.cli.preflight.pairs import check_pairs
from services.cli.preflight.parse import read_topology
from services.cli.preflight.ports import check_ports
from services.cli.preflight.report import Report
from services.cli.preflight.transport import check_transport
from services.cli.preflight.workers import VllmProbe, check_worker
from services.cli.topology import Topology
from services.hf.config import ModelConfig


def check_topology(
    path: Path,
    *,
    model: str | None = None,
    port: int | None = None,
    ports: bool = True,
) -> tuple[Topology | None, Report]:
    """The topology in `path` with `hetserve up`'s overrides applied (--model, --port), and
    what is wrong with it; `ports=False` leaves this machine's ports unchecked (CI)."""
    report = Report(str(path))
    topology = read_topology(path, report)
    if topology is None:
        return None, report
    if model:
        topology.model = model
    if port:
        topology.gateway.port = port
    check_names(topology, report)
    check_transport(topology, report)
    model_field = "--model" if model else "model"
    configs: dict[str, ModelConfig | None] = {
        topology.model: check_model_dir(topology.model, model_field, report)
    }
    probe = VllmProbe()
    for role in WORKER_ROLES:
        for index, spec in enumerate(getattr(topology, role)):
            # a worker may serve another model than the gateway's (env: HETSERVE_MODEL)
            worker_model = spec.env.get("HETSERVE_MODEL", topology.model)
            field = model_field
            if worker_model != topology.model:
                field = f"{role}[{index}].env.HETSERVE_MODEL"
                if worker_model not in configs:
                    configs[worker_model] = check_model_dir(worker_model, field, report)
            report.workers.append(
                check_worker(spec, role, index, configs[worker_model], field, probe, report)
            )
    report.pairs = check_pairs(topology, report)
    if ports:
        check_ports(topology, "--port" if port else "gateway.port", report)
    return topology, report
