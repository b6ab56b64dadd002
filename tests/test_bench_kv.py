"""`hetserve bench kv` at tiny sizes: every section is reported, with sane positive numbers.

The transfer and exposed sections start the real services (prefill, two decode instances,
converter) as processes against the session's nats-server, as the command does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proto.layout_registry import LAYOUTS
from services.bench.kv_convert import ConvertCase, pair_blocks, plan_cases
from services.cli.main import main
from services.common.nats_server import NatsServer

TINY_CONVERT = [
    "--layouts",
    "vllm-flash,ascend",
    "--dtypes",
    "float32,bfloat16:float32",
    "--tokens",
    "256",
    "--kv-heads",
    "2",
    "--head-dim",
    "32",
    "--repeats",
    "1",
]


def test_pairs_share_a_block_size_where_they_can() -> None:
    assert pair_blocks(LAYOUTS["vllm-flash"], LAYOUTS["sglang"]) == (16, 16)
    assert pair_blocks(LAYOUTS["vllm-flash"], LAYOUTS["ascend"]) == (128, 128)
    assert pair_blocks(LAYOUTS["vllm-paged-legacy"], LAYOUTS["gaudi"]) == (16, 128)
    cases, skipped = plan_cases(["ascend-310p", "gaudi"], [("bfloat16", "bfloat16")], [128])
    assert cases == [] and len(skipped) == 2  # 310P stores no bfloat16
    case = ConvertCase("a", "b", "bfloat16", "float32", 16, 16, 1, 1, 128)
    assert not case.permute_only


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "kv", "--route", "vllm-flash:vllm-flash"]) == 2
    assert main(["bench", "kv", "--layouts", "no-such-layout", "--sections", "convert"]) == 2
    assert "unknown layout" in capsys.readouterr().err


def test_convert_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "kv", "--sections", "convert", *TINY_CONVERT]) == 0
    table = capsys.readouterr().out
    assert "(a) conversion" in table and "vllm-flash -> ascend" in table
    assert "targets (issue 3)" in table and "permute-only" in table


def test_every_section_reported(
    nats_server: NatsServer,
    tiny_llama: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "kv.json"
    code = main(
        [
            "bench",
            "kv",
            *TINY_CONVERT,
            "--nats-url",
            nats_server.url,
            "--model",
            str(tiny_llama),
            "--transfer-requests",
            "2",
            "--prompt-tokens",
            "64",
            "--exposed-repeats",
            "1",
            "--json",
            "--output",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert {"machine", "config", "convert", "transfer", "exposed", "targets"} <= set(report)

    cases = report["convert"]["cases"]
    assert len(cases) == 4  # two directions x (float32, bfloat16 -> float32)
    for case in cases:
        assert case["convert_gbps"] > 0 and case["copy_gbps"] > 0 and case["ratio_to_copy"] > 0
        assert case["permute_only"] == (case["source_dtype"] == case["target_dtype"])

    routes = report["transfer"]["routes"]
    assert set(routes) == {"ceiling", "direct", "converter"}
    for route in routes.values():
        assert route["gbps"] > 0 and route["requests"] == 2 and route["ratio_to_ceiling"] > 0
    assert routes["ceiling"]["ratio_to_ceiling"] == routes["ceiling"]["median_paired_ratio"] == 1.0

    exposed = report["exposed"]
    assert exposed["colocated_prefill_s"] > 0 and exposed["kv_bytes"] > 0
    for route in ("direct", "converter"):
        r = exposed["routes"][route]
        assert r["ttft_s"] > 0 and r["transfer_s"] > 0 and r["transfer_alone_s"] > 0
        assert 0 <= r["exposed_s"] < r["transfer_s"] + r["ttft_s"]

    names = [t["name"] for t in report["targets"]]
    assert len(names) == 5 and all(isinstance(t["met"], bool) for t in report["targets"])
