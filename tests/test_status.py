"""`hetserve status` reads a bus as it is: against the test's real nats-server with a request
queue and registry entries made the way the services make them (a backlog, a half-placed
request, a stale entry), and the recent-error window instances announce."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from proto.kv_descriptor import KVDescriptor
from proto.messages import InstanceInfo
from services.cli.live import SCHEDULER_CONSUMER
from services.common import metrics
from services.common.bus import Bus
from services.common.nats_server import free_port
from services.common.settings import CommonSettings
from tests.system import ROOT

TTL_S = 600  # the registry TTL status judges by: a loaded machine may start it slowly


def status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "status", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HETSERVE_INSTANCE_TTL_S": str(TTL_S)},
    )


KV = KVDescriptor(
    layout="vllm-cpu", block_size=32, dtype="float32", num_layers=4, num_kv_heads=2, head_dim=32
)


@pytest.fixture
async def bus_with_backlog(nats_server):  # noqa: ANN001, ANN201
    """Under a fresh prefix: the request stream with the scheduler's consumer, 3 requests
    queued of which the scheduler took 1 and has not acknowledged it; a live decode entry,
    and a scheduler entry whose heartbeat stopped an hour ago."""
    settings = CommonSettings(nats_url=nats_server.url, prefix=f"t{uuid.uuid4().hex[:8]}")
    bus = await Bus.connect(settings, name="test")
    await bus.ensure_streams()
    s = bus.subjects
    queue = await bus.js.pull_subscribe(
        s.requests,
        durable=SCHEDULER_CONSUMER,
        stream=s.requests_stream,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=60.0),
    )
    for i in range(3):
        await bus.js.publish(s.requests, f"request {i}".encode())
    taken = await queue.fetch(1, timeout=5)
    assert len(taken) == 1
    registry = await bus.registry_bucket()
    decode = InstanceInfo(
        instance_id="d-0",
        role="decode",
        kv=KV,
        engine="vllm",
        running=2,
        waiting=1,
        free_blocks=40,
        total_blocks=64,
        heartbeat_at=time.time(),
        errors={"kv_stream/frame_rejected": 3},
        recent_errors={"kv_stream/frame_rejected": 1},
    )
    gone = InstanceInfo(
        instance_id="scheduler-0", role="scheduler", heartbeat_at=time.time() - 3600
    )
    await registry.put("d-0", decode.pack())
    await registry.put("scheduler-0", gone.pack())
    yield settings
    await bus.close()


async def test_status_table_queue_and_stale_entries(bus_with_backlog: CommonSettings) -> None:
    settings = bus_with_backlog
    run = status("--nats-url", settings.nats_url, "--prefix", settings.prefix)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == (
        f"hetserve at {settings.nats_url}, prefix {settings.prefix}: 1 live instance (decode 1)"
    )
    header = lines[2].split()
    assert header[:4] == ["INSTANCE", "ROLE", "ENGINE", "LAYOUT"]
    rows = {line.split()[0]: line for line in lines[3:5]}
    assert rows["d-0"].split()[:8] == [
        "d-0", "decode", "vllm", "vllm-cpu/32", "float32", "2", "1", "40/64",
    ]  # fmt: skip
    assert rows["d-0"].split()[8] == "1/3"  # errors: last 5 minutes / since start
    assert rows["scheduler-0"].endswith("(stale)")
    assert f"stale (no heartbeat for {TTL_S}s: stopped or hung): scheduler-0" in lines
    assert (
        f"request queue {settings.prefix}_requests: 2 waiting for a scheduler, 1 being placed"
        in lines
    )
    assert "errors in the last 5 min: d-0 kv_stream/frame_rejected 1" in lines


async def test_status_json(bus_with_backlog: CommonSettings) -> None:
    settings = bus_with_backlog
    run = status("--nats-url", settings.nats_url, "--prefix", settings.prefix, "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["prefix"] == settings.prefix
    assert report["request_queue"] == {
        "stream": f"{settings.prefix}_requests",
        "waiting": 2,
        "placing": 1,
    }
    by_id = {i["instance_id"]: i for i in report["instances"]}
    assert by_id["d-0"]["live"] is True and by_id["scheduler-0"]["live"] is False
    assert by_id["scheduler-0"]["heartbeat_age_s"] >= 3600
    assert report["instance_ttl_s"] == TTL_S
    assert KVDescriptor.model_validate(by_id["d-0"]["kv"]) == KV
    assert report["recent_errors"] == {"kv_stream/frame_rejected": 1}


def test_status_says_when_there_is_nothing_to_show(nats_server) -> None:  # noqa: ANN001
    run = status("--nats-url", nats_server.url, "--prefix", "nothing_here")
    assert run.returncode == 1
    assert "no hetserve registry (bucket nothing_here_instances)" in run.stderr
    closed = free_port()  # nothing listens there
    run = status("--nats-url", f"nats://127.0.0.1:{closed}", "--connect-timeout", "1")
    assert run.returncode == 1
    assert f"cannot reach NATS at nats://127.0.0.1:{closed} within 1s" in run.stderr
    assert "Traceback" not in run.stderr


async def test_status_creates_nothing_on_the_bus(nats_server) -> None:  # noqa: ANN001
    prefix = f"t{uuid.uuid4().hex[:8]}"
    assert status("--nats-url", nats_server.url, "--prefix", prefix).returncode == 1
    nc = await nats.connect(nats_server.url)
    try:
        names = [info.config.name async for info in _streams(nc)]
    finally:
        await nc.close()
    assert not any(prefix in name for name in names)


async def _streams(nc):  # noqa: ANN001, ANN202
    for info in await nc.jetstream().streams_info():
        yield info


def test_recent_errors_cover_the_window_only() -> None:
    component = f"test{uuid.uuid4().hex[:6]}"
    key = f"{component}/boom"
    window = metrics.RecentErrors(window_s=60)
    t0 = 1000.0
    metrics.error(component, "boom")
    totals, recent = window.update(t0)
    assert totals[key] == 1 and recent[key] == 1  # younger than the window: all recent
    metrics.error(component, "boom")
    totals, recent = window.update(t0 + 30)
    assert totals[key] == 2 and recent[key] == 2
    totals, recent = window.update(t0 + 70)  # the t0 sample (1 error) is the baseline now
    assert totals[key] == 2 and recent[key] == 1
    totals, recent = window.update(t0 + 100)  # the t0+30 sample (2) is: nothing recent
    assert totals[key] == 2 and key not in recent
    metrics.error(component, "boom")
    totals, recent = window.update(t0 + 101)
    assert totals[key] == 3 and recent[key] == 1
    # kept: the samples within the window and the newest one before it (its baseline)
    assert [at for at, _ in window.samples] == [t0 + 30, t0 + 70, t0 + 100, t0 + 101]
