"""Choosing the KV transport: the setting's default and environment variable, a topology's
top-level `kv_transport` handed to every instance `hetserve up` starts, and a bus on the
nats transport that never starts a transfer engine (nothing of mooncake is imported)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.launcher import plan_instances
from services.cli.topology import Topology
from services.common.settings import CommonSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = {"model": "models/tiny-llama", "prefill": [{"name": "p"}], "decode": [{"name": "d"}]}


def test_the_default_is_nats_and_the_environment_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CommonSettings().kv_transport == "nats"
    monkeypatch.setenv("HETSERVE_KV_TRANSPORT", "mooncake")
    monkeypatch.setenv("HETSERVE_MOONCAKE_PROTOCOL", "rdma")
    settings = WorkerSettings()
    assert (settings.kv_transport, settings.mooncake_protocol) == ("mooncake", "rdma")
    monkeypatch.setenv("HETSERVE_KV_TRANSPORT", "carrier-pigeon")
    with pytest.raises(ValueError, match="kv_transport"):
        CommonSettings()


def test_a_topology_chooses_for_every_instance() -> None:
    instances = plan_instances(Topology(**TOPOLOGY, kv_transport="mooncake"), "nats://x", "t")
    assert {i.env["HETSERVE_KV_TRANSPORT"] for i in instances} == {"mooncake"}
    # unset: each instance keeps its environment's choice
    plain = plan_instances(Topology(**TOPOLOGY), "nats://x", "t")
    assert not any("HETSERVE_KV_TRANSPORT" in i.env for i in plain)


def test_the_nats_transport_imports_nothing_of_mooncake() -> None:
    check = (
        "import sys, services.common.service, services.kv.endpoint; "
        "assert not [m for m in sys.modules if 'mooncake' in m], sorted(sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_preflight_checks_the_engine_imports(tmp_path: Path) -> None:
    from services.cli.preflight.run import check_topology
    from services.kv.mooncake_engine import MooncakeUnavailable, import_engine

    path = tmp_path / "topology.yaml"
    path.write_text(
        "model: models/tiny-llama\nkv_transport: mooncake\n"
        "prefill: [{name: p}]\ndecode: [{name: d}]\n"
    )
    _, report = check_topology(path, ports=False)
    try:
        import_engine()
        importable = True
    except MooncakeUnavailable:
        importable = False
    refused = [p for p in report.problems if p.field == "kv_transport"]
    assert bool(refused) != importable
