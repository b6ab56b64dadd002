"""`hetserve bench kv --transport nats,mooncake` at tiny sizes: both transports' routes, the
Mooncake ceiling (engine to engine) and issue 12's targets are reported, numbers positive.
The services run as processes against the session's nats-server with the real engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli.main import main

try:
    import mooncake.engine  # noqa: F401
except ImportError as exc:  # pragma: no cover - the only reason to skip
    pytest.skip(f"the mooncake package cannot be imported: {exc}", allow_module_level=True)


def test_both_transports_against_both_ceilings(
    nats_server,  # noqa: ANN001
    tiny_llama: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["bench", "kv", "--sections", "transfer,exposed", "--transport", "nats,mooncake"]
    args += ["--nats-url", nats_server.url, "--model", str(tiny_llama)]
    args += ["--prompt-tokens", "128", "--exposed-repeats", "1"]
    code = main([*args, "--transfer-requests", "2", "--transfer-tokens", "256", "--json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    transfers = report["transfers"]
    assert set(transfers["nats"]["routes"]) == {"ceiling", "direct", "converter"}
    assert set(transfers["mooncake"]["routes"]) == {"ceiling", "engine", "direct", "converter"}
    for transfer in transfers.values():
        for route in transfer["routes"].values():
            assert route["gbps"] > 0 and route["requests"] == 2
    assert report["transfer"] == transfers["nats"]  # the first transport, as before
    exposures = report["exposures"]
    assert report["exposed"] == exposures["nats"]
    for exposed in exposures.values():  # the real prefill streams over each transport
        for route in ("direct", "converter"):
            r = exposed["routes"][route]
            assert r["ttft_s"] > 0 and r["transfer_s"] > 0 and len(r["samples"]) == 1
    names = {t["name"] for t in report["targets"]}
    assert {
        "mooncake direct / Mooncake ceiling",
        "mooncake direct / nats direct",
        "mooncake via-converter / Mooncake ceiling",
        "mooncake exposed (TTFT - colocated) / colocated, direct",
        "mooncake exposed (TTFT - colocated) / colocated, converter",
    } <= names


def test_an_unknown_transport_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "kv", "--sections", "transfer", "--transport", "nats,pigeon"]) == 2
    assert "transports must be among" in capsys.readouterr().err
