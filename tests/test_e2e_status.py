"""What an operator sees of a whole running system (`hetserve up` over the test's real
nats-server): the progress lines while models load, the summary once every instance
announced itself (a row per instance, the KV route of each pair), and `hetserve status` as a
table, as JSON and refreshing, with the request queue and the errors of a failed request."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from proto.messages import InstanceInfo
from services.backends.vllm.engine_args import vllm_missing_reason
from services.common.nats_server import free_port_range
from tests.system import ROOT, RunningSystem, run_system

pytestmark = pytest.mark.slow

INSTANCES = ["scheduler-0", "converter-0", "p-0", "d-0", "gateway-0"]  # the launcher's order
DECODE_BLOCKS = 16


@pytest.fixture(scope="module")
def metrics_base() -> int:
    return free_port_range(len(INSTANCES))


@pytest.fixture(scope="module")
def system(
    nats_server, tiny_llama: Path, tmp_path_factory, metrics_base: int
) -> Iterator[RunningSystem]:  # noqa: ANN001
    topology = {
        "model": str(tiny_llama),
        "prefill": [{"name": "p", "kv_layout": "vllm-flash", "block_size": 16, "num_blocks": 64}],
        "decode": [
            {"name": "d", "kv_layout": "ascend", "block_size": 128, "num_blocks": DECODE_BLOCKS}
        ],
        "converter": {"replicas": 1},
    }
    env = {"HETSERVE_METRICS_PORT": str(metrics_base)}
    with run_system(topology, nats_server.url, tmp_path_factory.mktemp("status"), env) as system:
        yield system


def wait_for_summary(system: RunningSystem, timeout_s: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = system.log_text().splitlines()
        if any("instances ready in" in line for line in lines) and any(
            line.startswith("what is running: ") for line in lines
        ):
            return lines
        time.sleep(0.3)
    raise TimeoutError(f"no start-up summary:\n{system.log_text()[-3000:]}")


def hetserve_status(system: RunningSystem, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "status", "--nats-url", system.nats_url,
         "--prefix", system.prefix, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def stats(system: RunningSystem) -> dict[str, InstanceInfo]:
    async def ask() -> dict[str, InstanceInfo]:
        return {i: await system.stats(i) for i in INSTANCES}

    return asyncio.run(ask())


def test_progress_then_one_summary(system: RunningSystem, metrics_base: int) -> None:
    lines = wait_for_summary(system)
    progress = [line for line in lines if line.startswith("hetserve up: ") and "waiting" in line]
    assert progress, "no progress line while the models loaded"
    assert re.fullmatch(
        r"hetserve up: 0/5 instances ready after \d+s; waiting for scheduler-0 \(loading\), "
        r"converter-0 \(loading\), p-0 \(loading\), d-0 \(loading\), gateway-0 \(loading\)",
        progress[0],
    )
    assert len(progress) < 15  # never spammy
    summary_at = next(i for i, line in enumerate(lines) if "instances ready in" in line)
    assert [line for line in lines if "instances ready in" in line] == [lines[summary_at]]
    assert lines[summary_at].startswith("hetserve up: all 5 instances ready in ")
    header = lines[summary_at + 1].split()
    assert header == [
        "INSTANCE", "ROLE", "ENGINE", "LAYOUT", "BLOCK", "DTYPE", "TP", "DEVICE", "PID", "METRICS",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[summary_at + 2 : summary_at + 7]}
    assert list(rows) == INSTANCES
    infos = stats(system)
    for instance, info in infos.items():
        # one metrics port per process, counting up from HETSERVE_METRICS_PORT
        assert metrics_base <= info.metrics_port < metrics_base + len(INSTANCES)
        assert rows[instance][8:] == [str(info.pid), str(info.metrics_port)]
    assert rows["p-0"][:8] == [
        "p-0",
        "prefill",
        "native",
        "vllm-flash",
        "16",
        "float32",
        "1",
        "cpu",
    ]
    assert rows["d-0"][:8] == ["d-0", "decode", "native", "ascend", "128", "float32", "1", "cpu"]
    assert rows["converter-0"][1:8] == ["converter", "-", "-", "-", "-", "-", "-"]
    assert lines[summary_at + 7 : summary_at + 9] == [
        "KV routes (prefill -> decode):",
        "  p-0 -> d-0: via the converter (vllm-flash/16 float32 tp1 -> ascend/128 float32 tp1)",
    ]
    assert f"OpenAI API: http://127.0.0.1:{system.port}/v1 (also /health and /metrics)" in lines
    assert (
        f"what is running: hetserve status --nats-url {system.nats_url} "
        f"--prefix {system.prefix} [--watch]"
    ) in lines


async def _one_good_one_failed(system: RunningSystem) -> None:
    client = openai.AsyncOpenAI(base_url=system.base_url, api_key="unused", max_retries=0)
    reply = await client.completions.create(
        model="tiny-llama", prompt="the river", max_tokens=4, temperature=0
    )
    assert reply.usage.completion_tokens == 4
    with pytest.raises(openai.APIStatusError) as failed:
        await client.completions.create(
            model="tiny-llama",
            prompt="the hill",
            max_tokens=4,
            extra_body={"hetserve_route": {"prefill_instance": "p-9"}},
        )
    assert "p-9" in str(failed.value)


def status_json_when(system: RunningSystem, done, timeout_s: float = 20) -> dict:  # noqa: ANN001
    """`hetserve status --json` once `done(report)` holds (heartbeats come every second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = hetserve_status(system, "--json")
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        if done(report) or time.monotonic() > deadline:
            return report
        time.sleep(0.5)


def _errors_seen(report: dict) -> bool:
    return report["recent_errors"].get("scheduler/unroutable", 0) >= 1 and all(
        i["free_blocks"] == i["total_blocks"] for i in report["instances"] if i["role"] == "decode"
    )


def test_status_json_and_table(system: RunningSystem, metrics_base: int) -> None:
    asyncio.run(_one_good_one_failed(system))
    report = status_json_when(system, _errors_seen)
    assert report["prefix"] == system.prefix and report["nats_url"] == system.nats_url
    by_id = {i["instance_id"]: i for i in report["instances"]}
    assert sorted(by_id) == sorted(INSTANCES)
    assert all(i["live"] and i["heartbeat_age_s"] < 4 for i in by_id.values())
    decode = by_id["d-0"]
    assert (decode["kv"]["layout"], decode["kv"]["block_size"]) == ("ascend", 128)
    assert decode["free_blocks"] == decode["total_blocks"] == DECODE_BLOCKS
    assert decode["device"] == "cpu" and decode["running"] == 0
    assert by_id["scheduler-0"]["recent_errors"]["scheduler/unroutable"] == 1
    assert by_id["scheduler-0"]["running"] == 0  # nothing being placed
    assert report["request_queue"] == {
        "stream": f"{system.prefix}_requests",
        "waiting": 0,
        "placing": 0,
    }
    infos = stats(system)
    for instance, info in infos.items():
        assert by_id[instance]["pid"] == info.pid
        assert by_id[instance]["metrics_port"] == info.metrics_port

    run = hetserve_status(system)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == (
        f"hetserve at {system.nats_url}, prefix {system.prefix}: 5 live instances "
        "(gateway 1, scheduler 1, prefill 1, decode 1, converter 1)"
    )
    rows = {line.split()[0]: line.split() for line in lines[3:8]}
    assert list(rows) == ["gateway-0", "scheduler-0", "p-0", "d-0", "converter-0"]
    assert rows["d-0"][:8] == [
        "d-0", "decode", "native", "ascend/128", "float32", "0", "0", f"{DECODE_BLOCKS}/{DECODE_BLOCKS}",
    ]  # fmt: skip
    assert rows["p-0"][:4] == ["p-0", "prefill", "native", "vllm-flash/16"]
    assert rows["scheduler-0"][7] == "1/1"  # the unroutable request: last 5 min / all
    assert rows["d-0"][8] == "0/0"  # no errors
    assert re.fullmatch(r"[0-3]\.\ds", rows["d-0"][9]) and rows["d-0"][10:] == ["ago"]
    assert (
        f"request queue {system.prefix}_requests: 0 waiting for a scheduler, 0 being placed"
        in lines
    )
    errors = next(line for line in lines if line.startswith("errors in the last 5 min: "))
    assert "scheduler-0 scheduler/unroutable 1" in errors


def test_status_watch_refreshes(system: RunningSystem) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "status", "--nats-url", system.nats_url,
         "--prefix", system.prefix, "--watch", "--json", "--interval", "0.5"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        reports = [json.loads(watch.stdout.readline()) for _ in range(3)]
    finally:
        watch.terminate()
        watch.wait(10)
    taken = [r["taken_at"] for r in reports]
    assert taken == sorted(taken) and len(set(taken)) == 3
    assert all(len(r["instances"]) == len(INSTANCES) for r in reports)
    # a heartbeat every second: the decode entry was refreshed between the first and last
    beats = [next(i for i in r["instances"] if i["instance_id"] == "d-0") for r in reports]
    assert beats[-1]["heartbeat_at"] >= beats[0]["heartbeat_at"]


@pytest.mark.skipif(
    vllm_missing_reason() is not None,
    reason=f"the vllm extra is not installed: {vllm_missing_reason()}",
)
def test_summary_shows_what_vllm_allocated(nats_server, tiny_llama: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """The shipped vLLM -> native topology: the vLLM row is what vLLM's real cache is (its
    kv_layout is left to vLLM), and the pair goes direct."""
    topology = yaml.safe_load(
        (ROOT / "scripts/topologies/vllm-prefill-native-decode.yaml").read_text()
    )
    topology["model"] = str(tiny_llama)
    with run_system(topology, nats_server.url, tmp_path, timeout_s=400) as system:
        lines = wait_for_summary(system)
        run = hetserve_status(system)
    summary_at = next(i for i, line in enumerate(lines) if "instances ready in" in line)
    rows = {line.split()[0]: line.split() for line in lines[summary_at + 2 : summary_at + 7]}
    assert rows["p-vllm-0"][:8] == [
        "p-vllm-0", "prefill", "vllm", "vllm-cpu", "32", "float32", "1", "cpu",
    ]  # fmt: skip
    assert rows["d-native-0"][:8] == [
        "d-native-0", "decode", "native", "vllm-cpu", "32", "float32", "1", "cpu",
    ]  # fmt: skip
    assert (
        "  p-vllm-0 -> d-native-0: direct (vllm-cpu/32 float32 tp1 -> vllm-cpu/32 float32 tp1)"
        in lines
    )
    assert run.returncode == 0, run.stderr
    status_rows = {line.split()[0]: line.split() for line in run.stdout.splitlines()[3:8]}
    assert status_rows["p-vllm-0"][:5] == ["p-vllm-0", "prefill", "vllm", "vllm-cpu/32", "float32"]
