"""Prometheus metrics: the demo topology as five OS processes, each serving /metrics on its own
port; after one request every service's counters moved by exactly what the request did."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proto.messages import TokenEvent
from services.cli.launcher import Instance, plan_instances, stop_all
from services.cli.topology import DEMO_TOPOLOGY, Topology
from services.common import metrics
from services.common.nats_server import free_port
from tests.system import ROOT

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of one /metrics endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass
class MetricsSystem:
    ports: dict[str, int]  # instance name -> metrics port
    gateway_port: int

    def scrape(self, name: str) -> Samples:
        return scrape(self.ports[name])


def _wait(check, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s}s")
        time.sleep(0.3)


def _healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
        return reply.status == 200


@pytest.fixture(scope="module")
def system(nats_server, tiny_llama: Path, tmp_path_factory) -> Iterator[MetricsSystem]:  # noqa: ANN001
    raw = yaml.safe_load(DEMO_TOPOLOGY.read_text())
    raw["model"] = str(tiny_llama)
    raw["gateway"]["port"] = free_port()
    topology = Topology.model_validate(raw)
    prefix = f"m{os.getpid()}"
    instances: list[Instance] = plan_instances(topology, nats_server.url, prefix)
    ports = {inst.name: free_port() for inst in instances}
    logs = tmp_path_factory.mktemp("metrics")
    try:
        for inst in instances:
            env = {**os.environ, **inst.env, "HETSERVE_METRICS_PORT": str(ports[inst.name])}
            with open(logs / f"{inst.name}.log", "wb") as log:
                inst.process = subprocess.Popen(
                    [sys.executable, "-m", "services.cli", "serve", inst.role],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        _wait(lambda: _healthy(topology.gateway.port), 120, "the system was not healthy")
        for name, port in ports.items():
            _wait(
                lambda port=port: socket.create_connection(("127.0.0.1", port)).close() or True,
                30,
                f"{name} served no metrics",
            )
        yield MetricsSystem(ports, topology.gateway.port)
    finally:
        stop_all(instances)


def test_one_request_moves_every_service_counter(system: MetricsSystem) -> None:
    prompt, max_tokens = list(range(5, 205)), 12  # 200 tokens: two decode blocks of 128
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{system.gateway_port}/v1", api_key="unused", max_retries=0
    )
    reply = client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == max_tokens

    gateway = system.scrape("gateway-0")
    assert value(gateway, "hetserve_requests_total", outcome="finished") == 1
    assert value(gateway, "hetserve_prompt_tokens_total") == len(prompt)
    assert value(gateway, "hetserve_generation_tokens_total") == max_tokens
    for histogram in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        assert value(gateway, f"hetserve_{histogram}_seconds_count") == 1, histogram
        assert value(gateway, f"hetserve_{histogram}_seconds_sum") > 0, histogram
    assert value(gateway, "hetserve_time_to_first_token_seconds_sum") < value(
        gateway, "hetserve_e2e_request_latency_seconds_sum"
    )

    scheduler = system.scrape("scheduler-0")
    assert value(scheduler, "hetserve_routed_requests_total", route="converter") == 1
    assert value(scheduler, "hetserve_route_seconds_count") == 1

    prefill = system.scrape("p-nvidia-0")
    assert value(prefill, "hetserve_prefill_requests_total") == 1
    assert value(prefill, "hetserve_prefill_tokens_total") == len(prompt)
    assert value(prefill, "hetserve_prefill_seconds_count") == 1
    sent_frames = value(prefill, "hetserve_kv_sent_frames_total")
    assert sent_frames >= 2 + 2  # begin, end and at least one data frame per layer
    sent_bytes = value(prefill, "hetserve_kv_sent_bytes_total")

    # The converter took exactly the frames the prefill sent, and sent on what decode took.
    converter = system.scrape("converter-0")
    assert value(converter, "hetserve_kv_received_frames_total") == sent_frames
    assert value(converter, "hetserve_kv_received_bytes_total") == sent_bytes
    assert value(converter, "hetserve_conversions_total") == 1
    assert value(converter, "hetserve_kv_conversion_seconds_count") >= 2  # one per layer
    converted = value(converter, "hetserve_kv_converted_frames_total")
    assert converted >= 2
    assert value(converter, "hetserve_kv_sent_frames_total") == converted + 2
    assert value(converter, "hetserve_kv_converted_bytes_total") > 0

    decode = system.scrape("d-ascend-0")
    assert value(decode, "hetserve_kv_reservations_total", outcome="ok") == 1
    assert value(decode, "hetserve_kv_received_frames_total") == converted + 2
    assert value(decode, "hetserve_kv_received_bytes_total") == value(
        converter, "hetserve_kv_sent_bytes_total"
    )
    assert value(decode, "hetserve_decode_requests_total") == 1
    assert value(decode, "hetserve_decode_tokens_total") == max_tokens - 1  # first from prefill
    assert value(decode, "hetserve_decode_step_seconds_count") == max_tokens - 1

    for name in system.ports:
        errors = [k for k in system.scrape(name) if k[0] == "hetserve_errors_total"]
        assert errors == [], name


def test_state_gauges_follow_the_heartbeat(system: MetricsSystem) -> None:
    labels = {"role": "decode", "instance_id": "d-ascend-0"}

    blocks = yaml.safe_load(DEMO_TOPOLOGY.read_text())["decode"][0]["num_blocks"]

    def settled() -> bool:  # after the request above, every block is back
        decode = system.scrape("d-ascend-0")
        return (
            value(decode, "hetserve_kv_free_blocks", **labels) == blocks
            and value(decode, "hetserve_kv_used_blocks", **labels) == 0
        )

    _wait(settled, 10, f"decode's free-block gauge never showed {blocks} free")
    decode = system.scrape("d-ascend-0")
    assert ("hetserve_running_requests", tuple(sorted(labels.items()))) in decode
    prefill = system.scrape("p-nvidia-0")
    assert value(prefill, "hetserve_kv_free_blocks", role="prefill", instance_id="p-nvidia-0") > 0
    scheduler = system.scrape("scheduler-0")
    assert ("hetserve_queue_depth", (("queue", "requests"),)) in scheduler


def test_request_tracker_outcomes() -> None:
    def count(outcome: str) -> float:
        return metrics.REQUESTS.labels(outcome)._value.get()  # noqa: SLF001

    before = {o: count(o) for o in ("finished", "cancelled", "error")}
    with metrics.track_request(3) as tracked:
        tracked.delivered(TokenEvent(request_id="r", index=0, token_ids=[7]))
    with pytest.raises(GeneratorExit), metrics.track_request(3) as tracked:
        tracked.delivered(TokenEvent(request_id="r", index=0, token_ids=[7], finish_reason="stop"))
        raise GeneratorExit  # the HTTP layer closes the stream after the last event
    with pytest.raises(GeneratorExit), metrics.track_request(3):
        raise GeneratorExit
    with pytest.raises(RuntimeError), metrics.track_request(3):
        raise RuntimeError("boom")
    assert {o: count(o) - before[o] for o in before} == {"finished": 2, "cancelled": 1, "error": 1}


def test_metrics_port_in_use_is_a_startup_error() -> None:
    assert metrics.serve_metrics(0) is None
    port = free_port()
    stop = metrics.serve_metrics(port)
    try:
        assert "hetserve_requests_total" in str(scrape(port))
        with pytest.raises(ConnectionError, match=str(port)):
            metrics.serve_metrics(port)
    finally:
        stop()
