"""deploy/k8s checked without a cluster. Every manifest validates against Kubernetes' own
JSON schemas (from its OpenAPI spec; kubernetes-validate ships them, so this runs offline),
in strict mode (unknown fields fail), for the oldest and the newest version it knows. Then
what hetserve needs: a Deployment per role from the one image, only real HETSERVE_* settings,
a 3-node NATS cluster with JetStream whose config nats-server accepts, hetserve's streams and
bucket replicated 3 times (shown on a real 3-node cluster started from that config), the
gateway ready on /health, metrics annotated for Prometheus, resources on every container,
instance ids unique per pod, and the demo overlay's hostPath model."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from proto.layout_registry import get_layout
from services.cli.bus_config import password_variable, server_config
from services.common import settings as settings_module
from services.common.bus import Bus
from services.common.bus_permissions import ADMIN, BUS_USERS
from services.common.nats_server import find_nats_server, free_port
from services.common.settings import (
    CommonSettings,
    ConverterSettings,
    GatewaySettings,
    SchedulerSettings,
    WorkerSettings,
)

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
DEMO = K8S / "demo"
ROLES = {
    "gateway": GatewaySettings,
    "scheduler": SchedulerSettings,
    "converter": ConverterSettings,
    "prefill": WorkerSettings,
    "decode": WorkerSettings,
}
SCHEMA_VERSIONS = ("1.27", latest_version())
# tp runs one process per rank under one instance id: these manifests run tp=1 pods
# a Deployment's settings class (`both`: aggregated workers are decode instances)
SETTINGS_OF = {**ROLES, "both": ROLES["decode"]}
NOT_IN_MANIFESTS = {"instance_id", "tp_size", "tp_rank", "tp_master_addr", "tp_master_port"}
# the image has no vLLM: its engine options are not set there
NOT_IN_MANIFESTS |= {name for name in WorkerSettings.model_fields if name.startswith("vllm_")}
NOT_IN_MANIFESTS.add("mooncake_fail_write_after")  # fault injection for tests


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def render(directory: Path) -> list[dict]:
    """What `kubectl kustomize` makes of a kustomization that only lists resources and sets
    a namespace and images (deploy/k8s and its base)."""
    kustomization = _kustomization(directory)
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "resources", "images"}
    objects: list[dict] = []
    for entry in kustomization["resources"]:
        path = directory / entry
        objects += render(path) if path.is_dir() else _docs(path)
    images = {i["name"]: i for i in kustomization.get("images", [])}
    for obj in objects:
        if "namespace" in kustomization and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = kustomization["namespace"]
        for container in _containers(obj):
            name = container["image"].split(":")[0]
            if name in images:
                new = images[name]
                tag = new.get("newTag", container["image"].partition(":")[2])
                container["image"] = f"{new.get('newName', name)}:{tag}"
    return objects


def _containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def _by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render(K8S)


@pytest.fixture(scope="module")
def common(objects: list[dict]) -> dict[str, str]:
    return _by_kind(objects, "ConfigMap")["hetserve-common"]["data"]


@pytest.fixture(scope="module")
def nats_conf(objects: list[dict]) -> str:
    return _by_kind(objects, "ConfigMap")["nats-config"]["data"]["nats.conf"]


@pytest.fixture(scope="module")
def auth_conf(objects: list[dict]) -> str:
    return _by_kind(objects, "ConfigMap")["nats-config"]["data"]["auth.conf"]


@pytest.fixture(scope="module")
def passwords(objects: list[dict]) -> dict[str, str]:
    """The Secret's NATS_PASSWORD_<ROLE>: the NATS pods' environment."""
    return _by_kind(objects, "Secret")["nats-users"]["stringData"]


def _validate(obj: dict) -> None:
    for version in SCHEMA_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}): {where}: {exc.message}"
            )


def test_every_manifest_file_is_listed_and_valid_against_the_kubernetes_schemas(
    objects: list[dict],
) -> None:
    listed = set(_kustomization(BASE)["resources"])
    files = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert files == listed, f"not in base/kustomization.yaml: {files - listed}"
    assert _kustomization(K8S)["resources"] == ["base"]
    for path in sorted(BASE.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for obj in _docs(path):
                _validate(obj)
    for obj in objects:  # as rendered: namespace and image set
        _validate(obj)
        assert obj["metadata"].get("namespace", "hetserve") == "hetserve"
    assert len({(o["kind"], o["metadata"]["name"]) for o in objects}) == len(objects)


def test_every_role_is_a_deployment_of_the_one_image(objects: list[dict]) -> None:
    deployments = _by_kind(objects, "Deployment")
    assert set(deployments) == {*ROLES, "both"}
    both = deployments.pop("both")  # aggregated workers: decode that prefills, 0 by default
    (container,) = both["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["serve", "decode"] and both["spec"]["replicas"] == 0
    assert _env(both)["HETSERVE_PREFILL_LOCALLY_BELOW"] == "1073741824"
    images = {c["image"] for o in objects for c in _containers(o)}
    assert images == {"hetserve:latest"}, images  # NATS too: the image ships nats-server
    assert [i["name"] for i in _kustomization(BASE)["images"]] == ["hetserve"]
    for role, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["serve", role] and "command" not in container
        assert deployment["spec"]["replicas"] >= 1
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert labels["app.kubernetes.io/component"] == role
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (role, kind)
    for container in _containers(_by_kind(objects, "StatefulSet")["nats"]):
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])


def _env(deployment: dict) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": "hetserve-common"}}]
    return {
        e["name"]: e["value"] if "value" in e else f"<{e['valueFrom']['secretKeyRef']['key']}>"
        for e in container.get("env", [])
    }


def test_every_hetserve_variable_is_a_setting_and_every_setting_is_set(
    objects: list[dict], common: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = {name for cls in ROLES.values() for name in cls.model_fields}
    used = set()
    for role, deployment in _by_kind(objects, "Deployment").items():
        env = {**common, **_env(deployment)}
        names = {k.removeprefix("HETSERVE_").lower() for k in env if k.startswith("HETSERVE_")}
        own = {k.removeprefix("HETSERVE_").lower() for k in _env(deployment)}
        assert names <= fields, f"{role}: not settings: {names - fields}"
        assert own <= set(SETTINGS_OF[role].model_fields), f"{role}: not its settings: {own}"
        assert not {k for k in env if not k.startswith(("HETSERVE_", "OTEL_"))}, role
        used |= names
        # the values parse: the role's settings class built from exactly this environment
        for key in [k for k in os.environ if k.startswith("HETSERVE_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        parsed = SETTINGS_OF[role](_env_file=None)
        for key, value in env.items():
            name = key.removeprefix("HETSERVE_").lower()
            if key.startswith("HETSERVE_") and name in SETTINGS_OF[role].model_fields:
                field = getattr(parsed, name)
                assert field == type(field)(value), (role, key)
    missing = fields - used - NOT_IN_MANIFESTS
    assert not missing, f"settings the manifests do not set: {missing}"
    assert "HETSERVE_INSTANCE_ID" not in common
    assert common["OTEL_EXPORTER_OTLP_ENDPOINT"] == ""  # optional: documented, off


def test_instance_ids_hold_the_whole_pod_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # a Deployment's pod: <deployment>-<pod-template-hash, up to 10>-<5 random>
    for role in ROLES:
        pod = f"{role}-7d9c8b6f5d-x2x7k"
        monkeypatch.setattr(settings_module.socket, "gethostname", lambda pod=pod: pod)
        first, second = (settings_module.default_instance_id(role) for _ in range(2))
        assert first.startswith(f"{role}-{pod}-") and first != second


def test_prefill_and_decode_are_a_heterogeneous_pair(objects: list[dict]) -> None:
    deployments = _by_kind(objects, "Deployment")
    layouts = {}
    for role in ("prefill", "decode"):
        env = _env(deployments[role])
        spec = get_layout(env["HETSERVE_KV_LAYOUT"])
        assert int(env["HETSERVE_BLOCK_SIZE"]) in spec.block_sizes
        assert {"HETSERVE_KV_DTYPE", "HETSERVE_NUM_BLOCKS", "HETSERVE_DEVICE"} <= set(env)
        layouts[role] = spec.name
    assert layouts == {"prefill": "vllm-flash", "decode": "ascend"}  # as compose/.env


def test_the_model_comes_from_the_pvc_read_only(
    objects: list[dict], common: dict[str, str]
) -> None:
    claims = _by_kind(objects, "PersistentVolumeClaim")
    for role in ("gateway", "prefill", "decode"):
        pod = _by_kind(objects, "Deployment")[role]["spec"]["template"]["spec"]
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model"]
        assert mount["mountPath"] == common["HETSERVE_MODEL"] and mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == "model"]
        assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_gateway_service_and_readiness_on_health(objects: list[dict]) -> None:
    deployment = _by_kind(objects, "Deployment")["gateway"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = _env(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["HETSERVE_HOST"] == "0.0.0.0" and ports["http"] == int(env["HETSERVE_PORT"])
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and probe["port"] in ("http", ports["http"])
    service = _by_kind(objects, "Service")["gateway"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000 and port["targetPort"] in ("http", ports["http"])
    assert service["spec"]["selector"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_every_pod_is_annotated_for_prometheus_on_the_metrics_port(
    objects: list[dict], common: dict[str, str]
) -> None:
    port = common["HETSERVE_METRICS_PORT"]
    for role, deployment in _by_kind(objects, "Deployment").items():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", role
        assert annotations["prometheus.io/port"] == port, role
        assert annotations["prometheus.io/path"] == "/metrics", role
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert int(port) in {p["containerPort"] for p in container["ports"]}, role


def _routes(conf: str) -> list[str]:
    block = re.search(r"routes:\s*\[(.*?)\]", conf, re.S).group(1)
    return re.findall(r"nats://\S+", block)


def test_nats_is_a_cluster_of_3_with_jetstream_on_volumes(
    objects: list[dict], common: dict[str, str], nats_conf: str
) -> None:
    sts = _by_kind(objects, "StatefulSet")["nats"]
    replicas = sts["spec"]["replicas"]
    assert replicas == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    headless = _by_kind(objects, "Service")[sts["spec"]["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is True
    assert {p["port"] for p in headless["ports"]} >= {4222, 6222}
    name = sts["metadata"]["name"]
    assert _routes(nats_conf) == [
        f"nats://{name}-{i}.{sts['spec']['serviceName']}:6222" for i in range(replicas)
    ]
    assert re.search(r"^cluster\s*\{[^}]*\bport:\s*6222", nats_conf, re.M)
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    pod_name = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert container["envFrom"] == [{"secretRef": {"name": "nats-users"}}]
    assert "server_name: $POD_NAME" in nats_conf and pod_name["POD_NAME"] == "metadata.name"
    store = re.search(r"jetstream\s*\{[^}]*store_dir:\s*(\S+)", nats_conf).group(1)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert any(store.startswith(mounts[c]) for c in claims), (store, mounts)
    compose_conf = (ROOT / "compose" / "nats.conf").read_text()
    payload = re.compile(r"^max_payload:\s*(\S+)", re.M)
    assert payload.search(nats_conf).group(1) == payload.search(compose_conf).group(1) == "8MB"
    # hetserve's streams and bucket: replicated on every node
    assert common["HETSERVE_JETSTREAM_REPLICAS"] == str(replicas)
    assert common["HETSERVE_NATS_URL"] == "nats://nats:4222"
    client = _by_kind(objects, "Service")["nats"]["spec"]
    assert client["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert [p["port"] for p in client["ports"]] == [4222]
    assert _by_kind(objects, "PodDisruptionBudget")["nats"]["spec"]["maxUnavailable"] == 1
    for path in ("/healthz?js-enabled-only=true", "/healthz?js-server-only=true"):
        assert path in {
            container[p]["httpGet"]["path"]
            for p in ("startupProbe", "readinessProbe", "livenessProbe")
        }


def test_every_deployment_connects_as_its_roles_nats_user(objects: list[dict]) -> None:
    """Its own user, and of the Secret only its own role's password."""
    for name, deployment in _by_kind(objects, "Deployment").items():
        user = "decode" if name == "both" else name
        env = _env(deployment)
        assert env["HETSERVE_NATS_USER"] == user, name
        assert env["HETSERVE_NATS_PASSWORD"] == f"<{password_variable(user)}>", name


def test_the_nats_users_are_bus_configs(auth_conf: str, passwords: dict[str, str]) -> None:
    assert auth_conf == server_config("hetserve")
    assert set(passwords) == {password_variable(user) for user in BUS_USERS}


def test_nats_server_accepts_the_config(
    nats_conf: str, auth_conf: str, passwords: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "nats.conf").write_text(nats_conf)
    (tmp_path / "auth.conf").write_text(auth_conf)
    done = subprocess.run(
        [find_nats_server(), "-t", "-c", str(tmp_path / "nats.conf")],
        env={**os.environ, "POD_NAME": "nats-0", **passwords},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr


class LoopbackCluster:
    """The ConfigMap's nats.conf run as 3 servers on loopback: the same config, with only
    the addresses and store directories changed."""

    def __init__(self, conf: str, auth: str, passwords: dict[str, str], size: int):
        self.tmp = tempfile.TemporaryDirectory(prefix="hetserve-nats-cluster-")
        self.admin_password = passwords[password_variable(ADMIN)]
        (Path(self.tmp.name) / "auth.conf").write_text(auth)
        self.nodes = [(free_port(), free_port(), free_port()) for _ in range(size)]
        self.processes: list[subprocess.Popen] = []
        routes = _routes(conf)
        for i, (client, cluster, http) in enumerate(self.nodes):
            text = conf
            for old, new in (
                ("\nport: 4222\n", f"\nlisten: 127.0.0.1:{client}\n"),
                ("\nhttp_port: 8222\n", f"\nhttp: 127.0.0.1:{http}\n"),
                ("  port: 6222\n", f"  listen: 127.0.0.1:{cluster}\n"),
                ("store_dir: /data/jetstream", f'store_dir: "{self.tmp.name}/{i}"'),
                *(
                    (route, f"nats://127.0.0.1:{node[1]}")
                    for route, node in zip(routes, self.nodes, strict=True)
                ),
            ):
                assert text.count(old) == 1, old
                text = text.replace(old, new)
            path = Path(self.tmp.name) / f"nats-{i}.conf"
            path.write_text(text)
            self.processes.append(
                subprocess.Popen(
                    [find_nats_server(), "-c", str(path)],
                    env={**os.environ, "POD_NAME": f"nats-{i}", **passwords},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def url(self, i: int) -> str:
        """Node i, as the admin user (the nodes admit no anonymous client)."""
        return f"nats://{ADMIN}:{self.admin_password}@127.0.0.1:{self.nodes[i][0]}"

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Every node's /healthz: JetStream on and the meta group current (a quorum)."""
        deadline = time.monotonic() + timeout_s
        for _, _, http in self.nodes:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=1)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the NATS cluster did not form"
                    assert all(p.poll() is None for p in self.processes), "nats-server exited"
                    time.sleep(0.2)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.tmp.cleanup()


@pytest.fixture
def cluster(nats_conf: str, auth_conf: str, passwords: dict[str, str]) -> Iterator[LoopbackCluster]:
    nodes = LoopbackCluster(nats_conf, auth_conf, passwords, len(_routes(nats_conf)))
    try:
        nodes.wait_healthy()
        yield nodes
    finally:
        nodes.stop()


async def test_streams_and_registry_are_replicated_on_the_cluster(
    cluster: LoopbackCluster, common: dict[str, str]
) -> None:
    replicas = int(common["HETSERVE_JETSTREAM_REPLICAS"])
    settings = CommonSettings(
        _env_file=None,
        nats_url=cluster.url(1),
        jetstream_replicas=replicas,
        prefix=f"k8s{os.getpid()}",
    )
    bus = await Bus.connect(settings, name="k8s-manifest-test")
    try:
        assert bus.nc.max_payload == 8 * 1024 * 1024
        await bus.ensure_streams()
        registry = await bus.registry_bucket()
        await registry.put("probe", b"1")
        s = settings.subjects
        names = (s.requests_stream, s.completions_stream, f"KV_{s.registry_bucket}")
        for name in names:
            for _ in range(50):  # the replicas join the new stream's group
                info = await bus.js.stream_info(name)
                if len(info.cluster.replicas or []) == replicas - 1:
                    break
                await asyncio.sleep(0.1)
            assert info.config.num_replicas == replicas, name
            peers = {info.cluster.leader} | {r.name for r in info.cluster.replicas}
            assert peers == {f"nats-{i}" for i in range(replicas)}, name
    finally:
        await bus.close()


def test_default_replicas_stay_1() -> None:
    assert CommonSettings.model_fields["jetstream_replicas"].default == 1


def test_demo_overlay_mounts_the_model_from_a_host_path(objects: list[dict]) -> None:
    demo = _kustomization(DEMO)
    assert demo["resources"] == ["../base"]
    counts = {r["name"]: r["count"] for r in demo["replicas"]}
    assert set(counts) == {*ROLES, "both"} and counts.pop("both") == 0
    assert all(n >= 1 for n in counts.values())
    counts["both"] = 0
    patch_file, delete = demo["patches"]
    patch = _docs(DEMO / patch_file["path"])[0]
    (volume,) = patch["spec"]["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"] is None and volume["hostPath"]["path"]
    mounting = {
        name
        for name, d in _by_kind(objects, "Deployment").items()
        if any(
            "persistentVolumeClaim" in v and v["name"] == volume["name"]
            for v in d["spec"]["template"]["spec"].get("volumes", [])
        )
    }
    assert set(patch_file["target"]["name"].split("|")) == mounting
    deleted = yaml.safe_load(delete["patch"])
    assert deleted["$patch"] == "delete"
    assert deleted["metadata"]["name"] in _by_kind(objects, "PersistentVolumeClaim")
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # kustomize itself is not a test dependency
        return
    for directory in (K8S, DEMO):
        built = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
        )
        assert built.returncode == 0, built.stderr
        rendered = [d for d in yaml.safe_load_all(built.stdout) if d]
        for obj in rendered:
            _validate(obj)
        if directory == K8S:  # this file's renderer agrees with kustomize
            key = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
            assert sorted((o["kind"], o["metadata"]["name"]) for o in rendered) == key
        else:
            assert "PersistentVolumeClaim" not in {o["kind"] for o in rendered}
            for d in _by_kind(rendered, "Deployment").values():
                assert d["spec"]["replicas"] == counts[d["metadata"]["name"]]
                for v in d["spec"]["template"]["spec"].get("volumes", []):
                    assert "persistentVolumeClaim" not in v and "hostPath" in v
