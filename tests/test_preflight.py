"""`hetserve up` checks a topology before it starts anything: every refusal is one line naming
the file, the field and the fix, exit code 2, and nothing starts (no service ever reached the
test's NATS server: no request stream, no registry bucket under its prefix). `hetserve check`
runs the same checks alone (--json for scripts), and every topology the repo ships passes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import nats
import nats.js.errors
import pytest
import yaml

from proto.kv_descriptor import KVDescriptor
from proto.subjects import Subjects
from services.backends.vllm.engine_args import vllm_missing_reason
from services.hf.config import load_model_config
from tests.system import ROOT

SHIPPED = sorted((ROOT / "scripts" / "topologies").glob("*.yaml")) + [
    ROOT / "services" / "cli" / "demo_topology.yaml"
]
NEEDS_VLLM = pytest.mark.skipif(
    vllm_missing_reason() is not None,
    reason=f"the vllm extra is not installed: {vllm_missing_reason()}",
)


def hetserve(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_topology(tmp_path: Path, topology: dict) -> Path:
    path = tmp_path / f"topology-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(topology))
    return path


def base_topology(model: Path) -> dict:
    return {
        "model": str(model),
        "prefill": [{"name": "p", "kv_layout": "vllm-flash", "block_size": 16}],
        "decode": [{"name": "d", "kv_layout": "vllm-flash", "block_size": 16}],
        "converter": {"replicas": 1},
    }


async def prefix_untouched(nats_url: str, prefix: str) -> bool:
    """No service ever started under `prefix`: each creates the request stream and the
    registry bucket first thing."""
    subjects = Subjects(prefix)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for probe in (
            js.stream_info(subjects.requests_stream),
            js.key_value(subjects.registry_bucket),
        ):
            try:
                await probe
                return False
            except nats.js.errors.NotFoundError:
                pass
        return True
    finally:
        await nc.close()


def model_with(tmp_path: Path, tiny_llama: Path, **config: object) -> Path:
    """A copy of the tiny model with config.json fields changed (the checks read only it)."""
    model = tmp_path / f"model-{uuid.uuid4().hex[:6]}"
    shutil.copytree(tiny_llama, model)
    raw = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**raw, **config}))
    return model


def _duplicate_names(t: dict, tmp_path: Path, tiny: Path) -> dict:
    # the case: a vLLM -> vLLM topology naming both sides vllm-tp1 (native here)
    t["prefill"][0]["name"] = t["decode"][0]["name"] = "vllm-tp1"
    return t


def _unknown_layout(t: dict, tmp_path: Path, tiny: Path) -> dict:
    t["prefill"][0]["kv_layout"] = "flash-nhd"
    return t


def _block_size(t: dict, tmp_path: Path, tiny: Path) -> dict:
    t["decode"][0].update(kv_layout="ascend", block_size=16)
    return t


def _dtype(t: dict, tmp_path: Path, tiny: Path) -> dict:
    t["decode"][0].update(kv_layout="gaudi", block_size=128, dtype="float16")
    return t


def _tp_vs_kv_heads(t: dict, tmp_path: Path, tiny: Path) -> dict:
    # 12 heads, 4 KV heads, MLP 360: tp 6 splits the heads and the MLP, not the KV heads
    t["model"] = str(
        model_with(
            tmp_path, tiny, num_attention_heads=12, num_key_value_heads=4, intermediate_size=360
        )
    )
    t["prefill"][0]["tp"] = 6
    return t


def _vllm_block_size(t: dict, tmp_path: Path, tiny: Path) -> dict:
    t["prefill"][0] = {"name": "p", "engine": "vllm", "block_size": 16}
    return t


def _missing_model_dir(t: dict, tmp_path: Path, tiny: Path) -> dict:
    t["model"] = str(tmp_path / "no-such-model")
    return t


def _missing_config(t: dict, tmp_path: Path, tiny: Path) -> dict:
    empty = tmp_path / f"empty-{uuid.uuid4().hex[:6]}"
    empty.mkdir()
    t["model"] = str(empty)
    return t


def _converter_needed(t: dict, tmp_path: Path, tiny: Path) -> dict:
    t["decode"][0].update(kv_layout="ascend", block_size=128)
    t["converter"] = {"replicas": 0}
    return t


# (case, field, words of the problem, words of the fix)
REFUSALS = [
    (
        _duplicate_names,
        "decode[0].name",
        "instance id vllm-tp1-0 clashes with prefill[0] (vllm-tp1)",
        "give every prefill, decode and both entry a name of its own",
    ),
    (
        _unknown_layout,
        "prefill[0].kv_layout",
        "unknown KV layout 'flash-nhd'",
        "use one of: ascend, ascend-310p,",
    ),
    (
        _block_size,
        "decode[0].block_size",
        "layout ascend takes block sizes 128, not 16",
        "set block_size to 128",
    ),
    (
        _dtype,
        "decode[0].dtype",
        "layout gaudi does not store float16",
        "set dtype to one of float32, bfloat16",
    ),
    (
        _tp_vs_kv_heads,
        "prefill[0].tp",
        "tp 6 does not split the model's 4 KV heads (tp above them must be a multiple)",
        "use tp 1, 2, 4, 12",
    ),
    pytest.param(
        _vllm_block_size,
        "prefill[0].block_size",
        "vLLM's CPU attention needs a block size multiple of 32, not 16",
        "set block_size to 32",
        marks=NEEDS_VLLM,
    ),
    (_missing_model_dir, "model", "no-such-model does not exist", "point model at a Hugging Face"),
    (_missing_config, "model", "has no config.json", "config.json, tokenizer.json, *.safetensors"),
    (
        _converter_needed,
        "converter.replicas",
        "p (vllm-flash/16 float32 tp1) -> d (ascend/128 float32 tp1) needs the converter",
        "set converter: {replicas: 1}",
    ),
]


@pytest.mark.parametrize(("case", "field", "problem", "fix"), REFUSALS)
def test_up_refuses_before_starting_anything(
    case, field: str, problem: str, fix: str, tiny_llama: Path, tmp_path: Path, nats_server
) -> None:  # noqa: ANN001
    path = write_topology(tmp_path, case(base_topology(tiny_llama), tmp_path, tiny_llama))
    prefix = f"t{uuid.uuid4().hex[:8]}"
    run = hetserve("up", "--topology", str(path), "--nats-url", nats_server.url, "--prefix", prefix)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    mine = [line for line in lines if line.startswith(f"{path}: {field}: ")]
    assert len(mine) == 1, run.stderr
    said, _, fixed = mine[0].partition("; fix: ")
    assert problem in said and fix in fixed, mine[0]
    assert lines[-1].startswith("hetserve up: ") and lines[-1].endswith("nothing was started")
    assert "started" not in run.stdout
    assert asyncio.run(prefix_untouched(nats_server.url, prefix))


def test_up_refuses_a_busy_gateway_port(tiny_llama: Path, tmp_path: Path, nats_server) -> None:  # noqa: ANN001
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        topology = {**base_topology(tiny_llama), "gateway": {"port": port}}
        path = write_topology(tmp_path, topology)
        prefix = f"t{uuid.uuid4().hex[:8]}"
        up = hetserve(
            "up", "--topology", str(path), "--nats-url", nats_server.url, "--prefix", prefix
        )
        # the same port from the command line: the option is named, not the file's field
        other = write_topology(tmp_path, base_topology(tiny_llama))
        check = hetserve("check", str(other), "--port", str(port))
    assert up.returncode == 2, up.stderr
    assert (
        f"{path}: gateway.port: gateway-0 cannot listen on 127.0.0.1:{port}: "
        "Address already in use; fix: stop what holds it"
    ) in up.stderr
    assert asyncio.run(prefix_untouched(nats_server.url, prefix))
    assert check.returncode == 2
    assert f"{other}: --port: gateway-0 cannot listen on 127.0.0.1:{port}" in check.stdout


def test_every_problem_of_a_topology_is_reported_at_once(tiny_llama: Path, tmp_path: Path) -> None:
    topology = base_topology(tiny_llama)
    topology["prefill"][0].update(kv_layout="nope", tp=3)
    topology["decode"][0].update(kv_layout="ascend", block_size=16, dtype="float64")
    run = hetserve("check", str(write_topology(tmp_path, topology)), "--no-ports")
    assert run.returncode == 2
    fields = [line.split(": ")[1] for line in run.stdout.splitlines()[:-1]]
    assert fields == [
        "prefill[0].kv_layout",
        "prefill[0].tp",
        "decode[0].block_size",
        "decode[0].dtype",
    ]
    assert run.stdout.splitlines()[-1].endswith("4 problems; hetserve up would start nothing")


def test_a_malformed_topology_names_each_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nprefill: [{name: a, tp: 0, replica: 2}]\n")
    run = hetserve("check", str(path))
    assert run.returncode == 2
    assert run.stdout.splitlines()[:2] == [
        f"{path}: prefill[0].tp: Input should be greater than or equal to 1; "
        "fix: correct prefill[0].tp",
        f"{path}: prefill[0].replica: Extra inputs are not permitted; "
        "fix: remove prefill[0].replica (or fix its spelling)",
    ]
    path.write_text("model: m\nprefill: [{name: a}]\n")
    run = hetserve("check", str(path))
    assert run.returncode == 2
    assert run.stdout.splitlines()[0] == (
        f"{path}: (top level): a topology needs a decode or a both instance; "
        "fix: see scripts/topologies/*.yaml for complete topologies"
    )
    path.write_text("model: m\nprefill: [{name: a\n")
    run = hetserve("check", str(path))
    assert run.returncode == 2
    assert run.stdout.startswith(f"{path}: line 3, column 1: not valid YAML: expected ','")


def test_check_json_reports_the_plan(tiny_llama: Path, tmp_path: Path) -> None:
    topology = base_topology(tiny_llama)
    topology["prefill"].append({"name": "p-same", "kv_layout": "ascend", "block_size": 128})
    topology["decode"][0].update(kv_layout="ascend", block_size=128, replicas=2)
    run = hetserve("check", str(write_topology(tmp_path, topology)), "--json", "--no-ports")
    assert run.returncode == 0, run.stdout
    report = json.loads(run.stdout)
    assert report["ok"] is True and report["problems"] == [] and report["warnings"] == []
    cfg = load_model_config(tiny_llama)
    expected = KVDescriptor(
        layout="ascend",
        block_size=128,
        dtype="float32",
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
    )
    decode = report["workers"][2]
    assert decode["field"] == "decode[0]" and decode["instances"] == ["d-0", "d-1"]
    assert decode["kv_id"] == expected.id and decode["kv"] == expected.model_dump()
    assert report["pairs"] == [
        {"prefill": "p", "decode": "d", "route": "converter"},
        {"prefill": "p-same", "decode": "d", "route": "direct"},
    ]
    # with problems: exit 2, each with its file, field, problem and fix
    topology["decode"][0]["dtype"] = "int8"
    path = write_topology(tmp_path, topology)
    run = hetserve("check", str(path), "--json", "--no-ports")
    assert run.returncode == 2
    report = json.loads(run.stdout)
    assert report["ok"] is False
    assert report["problems"] == [
        {
            "file": str(path),
            "field": "decode[0].dtype",
            "problem": "d: unknown dtype 'int8'",
            "fix": "set dtype to one of float32, bfloat16, float16",
        }
    ]


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, id=p.name, marks=NEEDS_VLLM if "engine: vllm" in p.read_text() else ())
        for p in SHIPPED
    ],
)
def test_every_shipped_topology_passes_check(path: Path, tiny_llama: Path) -> None:
    # --no-ports: this machine's ports are not the file's business (the demo's 8000 may be
    # taken by another run); the model is the tiny one the topologies name
    run = hetserve("check", str(path), "--model", str(tiny_llama), "--no-ports")
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{path}: ok" in run.stdout
    assert "route " in run.stdout and "cannot pair" not in run.stdout


def test_both_entries_and_local_prefill(tiny_llama: Path, tmp_path: Path) -> None:
    """Aggregated (both) instances take part in every check; a pair into one that would need
    the converter is only a warning, since it prefills what it decodes itself."""
    topology = {
        "model": str(tiny_llama),
        "prefill": [{"name": "p", "kv_layout": "vllm-flash", "block_size": 16}],
        "both": [{"name": "agg", "kv_layout": "ascend", "block_size": 128}],
        "converter": {"replicas": 0},
    }
    run = hetserve("check", str(write_topology(tmp_path, topology)), "--json", "--no-ports")
    assert run.returncode == 0, run.stdout
    report = json.loads(run.stdout)
    assert report["pairs"] == [{"prefill": "p", "decode": "agg", "route": "converter"}]
    assert [w["field"] for w in report["warnings"]] == ["converter.replicas"]
    assert "agg only serves prompts it prefills itself" in report["warnings"][0]["problem"]
    topology["both"].append({"name": "p", "kv_layout": "ascend", "block_size": 16, "tp": 3})
    run = hetserve("check", str(write_topology(tmp_path, topology)), "--json", "--no-ports")
    assert run.returncode == 2
    assert [p["field"] for p in json.loads(run.stdout)["problems"]] == [
        "both[1].name",
        "both[1].block_size",
        "both[1].tp",
    ]


def test_a_busy_metrics_port_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    """With HETSERVE_METRICS_PORT, hetserve up gives each process the next port (scheduler,
    converter, prefill, decode, gateway): one taken is a refusal naming that process."""
    path = write_topology(tmp_path, base_topology(tiny_llama))
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        base = taken - 2  # the third process, p-0, would get the taken one
        run = subprocess.run(
            [sys.executable, "-m", "services.cli", "check", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HETSERVE_METRICS_PORT": str(base)},
        )
    assert run.returncode == 2
    assert (
        f"{path}: HETSERVE_METRICS_PORT: p-0 cannot serve metrics on port {taken}: "
        "Address already in use; fix: stop what holds it"
    ) in run.stdout
