"""The ports `hetserve up` will listen on are free: every gateway's and, with
HETSERVE_METRICS_PORT set, the metrics port it gives each process (the launcher's plan)."""

from __future__ import annotations

import socket

from services.cli.launcher import plan_instances
from services.cli.preflight.report import Report
from services.cli.topology import Topology


def port_busy(host: str, port: int) -> str | None:
    """Why `port` cannot be listened on at `host`, or None when it can."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def check_ports(topology: Topology, port_field: str, report: Report) -> None:
    gateway = topology.gateway
    taken: dict[int, str] = {}
    for i in range(gateway.replicas):
        port = gateway.port + i
        taken[port] = f"gateway-{i}"
        if not 0 < port < 65536:
            report.refuse(port_field, f"gateway-{i} port {port} is not a TCP port", "use 1-65535")
            continue
        busy = port_busy(gateway.host, port)
        if busy:
            report.refuse(
                port_field,
                f"gateway-{i} cannot listen on {gateway.host}:{port}: {busy}",
                f"stop what holds it (ss -ltnp 'sport = :{port}') or choose another port "
                "(gateway.port, or hetserve up --port)",
            )
    for inst in plan_instances(topology, "nats://unused", "preflight"):
        value = inst.env.get("HETSERVE_METRICS_PORT")
        if not value:
            continue
        port = int(value)
        field = "HETSERVE_METRICS_PORT"
        if not 0 < port < 65536:
            report.refuse(field, f"{inst.name} would get metrics port {port}", "start lower")
        elif port in taken:
            report.refuse(
                field,
                f"{inst.name} would get metrics port {port}, which {taken[port]} uses",
                "choose a metrics port range that leaves the gateway ports out",
            )
        elif busy := port_busy("", port):
            report.refuse(
                field,
                f"{inst.name} cannot serve metrics on port {port}: {busy}",
                "stop what holds it or set HETSERVE_METRICS_PORT to another free range",
            )
        taken[port] = inst.name
