"""compose/ checked without Docker: every knob in .env is a real setting and every setting
has a knob, workers scale without fixed names or ports, the two worker kinds use different
layouts, Prometheus scrapes every role on the metrics port, and the Grafana dashboard only
queries metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from proto.layout_registry import get_layout
from services.common import metrics  # noqa: F401 - registers every metric
from services.common.settings import (
    ConverterSettings,
    GatewaySettings,
    SchedulerSettings,
    WorkerSettings,
)

COMPOSE = Path(__file__).resolve().parents[1] / "compose"
ROLES = ("gateway", "scheduler", "converter", "prefill", "decode")
PER_WORKER = {"kv_layout", "block_size", "kv_dtype", "num_blocks", "device"}
SET_BY_COMPOSE = {"instance_id", "model", "host", "port", "nats_user", "nats_password"}
# one process per TP rank under one instance id: compose runs tp=1 containers
NOT_UNDER_COMPOSE = {"tp_size", "tp_rank", "tp_master_addr", "tp_master_port"}
# the compose image has no vLLM (the vllm extra is 3.5 GiB): its engine options stay out
NOT_UNDER_COMPOSE |= {name for name in WorkerSettings.model_fields if name.startswith("vllm_")}
NOT_UNDER_COMPOSE.add("mooncake_fail_write_after")  # fault injection for tests


def env_file() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in (COMPOSE / ".env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return {key: value for key, value in pairs}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def test_every_setting_has_a_knob_and_every_knob_is_a_setting(compose: dict) -> None:
    fields = {
        name
        for cls in (GatewaySettings, SchedulerSettings, WorkerSettings, ConverterSettings)
        for name in cls.model_fields
    }
    env = env_file()
    knobs = {key.removeprefix("HETSERVE_").lower() for key in env if key.startswith("HETSERVE_")}
    assert knobs <= fields, f"unknown settings in .env: {knobs - fields}"
    for role in ("prefill", "decode"):
        overrides = compose["services"][role]["environment"]
        for name in PER_WORKER:
            value = overrides[f"HETSERVE_{name.upper()}"]
            knob = re.fullmatch(r"\$\{(\w+):-[^}]*\}", value).group(1)
            assert knob in env, f"{role}: {knob} is not in .env"
    missing = fields - knobs - PER_WORKER - SET_BY_COMPOSE - NOT_UNDER_COMPOSE
    assert not missing, f"settings without a knob in .env: {missing}"


def test_workers_scale_and_pair_two_layouts(compose: dict) -> None:
    services, env = compose["services"], env_file()
    for role in ROLES:
        service = services[role]
        assert service["command"] == ["serve", role]
        assert service["image"] == services["nats"]["image"]  # one image for everything
        assert "container_name" not in service
        assert "HETSERVE_INSTANCE_ID" not in service.get("environment", {})
        if role != "gateway":  # a fixed host port would stop --scale
            assert "ports" not in service
    assert "HETSERVE_INSTANCE_ID" not in env
    layouts = {}
    for role in ("prefill", "decode"):
        prefix = role.upper()
        spec = get_layout(env[f"{prefix}_KV_LAYOUT"])
        assert int(env[f"{prefix}_BLOCK_SIZE"]) in spec.block_sizes
        layouts[role] = spec.name
    assert layouts["prefill"] != layouts["decode"]


def test_nats_has_jetstream_on_a_volume_and_a_health_check(compose: dict) -> None:
    nats = compose["services"]["nats"]
    conf = (COMPOSE / "nats.conf").read_text()
    store = re.search(r"store_dir:\s*(\S+)", conf).group(1)
    assert f"nats-data:{store}" in nats["volumes"]
    assert "nats-data" in compose["volumes"]
    assert "healthz" in " ".join(nats["healthcheck"]["test"])
    for role in ROLES:
        assert compose["services"][role]["depends_on"]["nats"]["condition"] == "service_healthy"


def test_prometheus_scrapes_every_role_on_the_metrics_port(compose: dict) -> None:
    port = int(env_file()["HETSERVE_METRICS_PORT"])
    config = yaml.safe_load((COMPOSE / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for role in ROLES:
        (sd,) = jobs[role]["dns_sd_configs"]
        assert sd["names"] == [role] and sd["port"] == port
    for name in ("jaeger", "prometheus", "grafana"):
        assert compose["services"][name]["profiles"] == ["observability"]


def _exported_names() -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in suffixes.get(family.type, ())
    }


def test_dashboard_queries_only_existing_metrics() -> None:
    dashboard = json.loads((COMPOSE / "grafana/dashboards/hetserve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"hetserve_\w+", expr)}
    assert used <= _exported_names(), used - _exported_names()
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for topic in (
        "request rate",
        "first token",
        "per output token",
        "kv bytes",
        "converter",
        "queue",
        "free kv blocks",
    ):
        assert topic in titles
