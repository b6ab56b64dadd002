"""The KV transport a topology asks for can run here: `mooncake` needs the transfer engine
importable (the `[mooncake]` extra and Debian's libibverbs1), or every worker would fail at
start."""

from __future__ import annotations

from services.cli.preflight.report import Report
from services.cli.topology import Topology


def check_transport(topology: Topology, report: Report) -> None:
    if topology.kv_transport != "mooncake":
        return
    from services.kv.mooncake_engine import MooncakeUnavailable, import_engine

    try:
        import_engine()
    except MooncakeUnavailable as exc:
        report.refuse(
            "kv_transport",
            f"the Mooncake Transfer Engine cannot be imported ({exc.__cause__ or exc})",
            "pip install -e '.[mooncake]' (and apt-get install libibverbs1), or kv_transport: nats",
        )
