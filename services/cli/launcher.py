"""`hetserve up`: NATS (embedded unless a URL is given) and every instance of a topology,
each its own OS process. Ctrl-C (or SIGTERM) stops everything it started."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from proto.subjects import Subjects
from services.cli.restarts import RestartPolicy
from services.cli.startup_report import StartupReport
from services.cli.topology import ALWAYS, SPEED_KEYS, Topology, WorkerSpec, worker_instance_id
from services.common.bus_permissions import ADMIN, authorization
from services.common.bus_users import DEFAULT_STATE_DIR, BusUsers, url_file
from services.common.nats_server import NatsServer, free_port

log = logging.getLogger(__name__)


@dataclass
class Instance:
    name: str
    role: str
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # dead, to be started again then


def plan_instances(
    topology: Topology,
    nats_url: str,
    prefix: str,
    gateway_env: dict[str, str] | None = None,
    users: BusUsers | None = None,
) -> list[Instance]:
    """`gateway_env`: settings for the gateways only (the API keys of `hetserve up --api-key`).
    `users`: the server's per-role users; each process connects as its role's."""
    base = {"HETSERVE_NATS_URL": nats_url, "HETSERVE_PREFIX": prefix}
    if topology.kv_transport is not None:
        base["HETSERVE_KV_TRANSPORT"] = topology.kv_transport
    out: list[Instance] = []
    for i in range(topology.scheduler.replicas):
        out.append(Instance(f"scheduler-{i}", "scheduler", {**base}))
    for i in range(topology.converter.replicas):
        out.append(Instance(f"converter-{i}", "converter", {**base}))
    for role, specs, aggregated in (
        ("prefill", topology.prefill, False),
        ("decode", topology.decode, False),
        ("decode", topology.both, True),  # a decode instance that prefills every prompt itself
    ):
        for spec in specs:
            for i in range(spec.replicas):
                env = {
                    **base,
                    **worker_env(topology, spec, aggregated),
                    "HETSERVE_INSTANCE_ID": worker_instance_id(spec, i),
                }
                # One process per tensor-parallel rank, all with the instance's id; vLLM
                # starts its own rank processes.
                port = str(free_port()) if spec.tp > 1 else "0"
                for rank in range(spec.tp if spec.engine == "native" else 1):
                    name = worker_instance_id(spec, i) + (f"/rank{rank}" if spec.tp > 1 else "")
                    out.append(
                        Instance(
                            name,
                            role,
                            {
                                **env,
                                "HETSERVE_TP_SIZE": str(spec.tp),
                                "HETSERVE_TP_RANK": str(rank),
                                "HETSERVE_TP_MASTER_PORT": port,
                            },
                        )
                    )
    for i in range(topology.gateway.replicas):
        out.append(
            Instance(
                f"gateway-{i}",
                "gateway",
                {
                    **base,
                    "HETSERVE_MODEL": topology.model,
                    "HETSERVE_HOST": topology.gateway.host,
                    "HETSERVE_PORT": str(topology.gateway.port + i),
                    **(gateway_env or {}),
                },
            )
        )
    metrics_port = int(os.environ.get("HETSERVE_METRICS_PORT", "0"))
    for index, inst in enumerate(out):
        inst.env.setdefault("HETSERVE_INSTANCE_ID", inst.name)
        if users is not None:
            inst.env["HETSERVE_NATS_URL"] = users.url(nats_url, inst.role)
        if metrics_port:  # one Prometheus port per process, counting up from the given one
            inst.env["HETSERVE_METRICS_PORT"] = str(metrics_port + index)
    return out


def worker_env(topology: Topology, spec: WorkerSpec, aggregated: bool = False) -> dict[str, str]:
    env = {
        "HETSERVE_MODEL": topology.model,
        "HETSERVE_ENGINE": spec.engine,
        "HETSERVE_KV_LAYOUT": spec.kv_layout,
        "HETSERVE_BLOCK_SIZE": str(spec.block_size),
        "HETSERVE_KV_DTYPE": spec.dtype,
        "HETSERVE_NUM_BLOCKS": str(spec.num_blocks),
        "HETSERVE_DEVICE": spec.device,
        "HETSERVE_TORCH_THREADS": "1",
        "HETSERVE_MAX_MODEL_LEN": str(spec.max_model_len),
        "HETSERVE_PREFILL_LOCALLY_BELOW": str(ALWAYS if aggregated else spec.prefill_locally_below),
    }
    used = {key: v for key, v in spec.speed.items() if key in SPEED_KEYS and v is not None}
    env.update({f"HETSERVE_EXPECTED_{key.upper()}": str(v) for key, v in used.items()})
    env.update({f"HETSERVE_VLLM_{key.upper()}": str(value) for key, value in spec.vllm.items()})
    env.update(spec.env)
    return env


def keep_serving(server: NatsServer) -> None:
    """Start the embedded server again if it died: same port, users and JetStream store, so
    the services reconnect (they retry for ever) and find their streams and registry."""
    rc = server.process.poll() if server.process else None
    if rc is None:
        return
    log.warning("embedded NATS exited with code %s; starting it again at %s", rc, server.url)
    try:
        server.start()
    except (RuntimeError, TimeoutError, OSError) as exc:
        log.error("embedded NATS did not start again (next try in a moment): %s", exc)


def start(inst: Instance) -> None:
    env = {**os.environ, **inst.env}
    inst.process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", inst.role],
        env=env,
    )
    inst.started_at = time.monotonic()
    inst.restart_at = None


def stop_all(instances: list[Instance], timeout_s: float = 10.0) -> None:
    for inst in instances:
        if inst.process is not None and inst.process.poll() is None:
            inst.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for inst in instances:
        if inst.process is None:
            continue
        try:
            inst.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            inst.process.kill()
            inst.process.wait()


def run_up(
    topology: Topology,
    nats_url: str | None,
    prefix: str,
    gateway_env: dict[str, str] | None = None,
    state_dir: Path = DEFAULT_STATE_DIR,
    restart: bool = True,
) -> int:
    """An embedded server (no `nats_url`) admits only its per-role users, whose URLs go to
    `state_dir`/nats/<role>.url; a given server is the operator's to secure. With `restart`,
    an instance that died is started again (services/cli/restarts.py says when)."""
    server, users = None, None
    if nats_url is None:
        users = BusUsers()
        server = NatsServer(authorization=authorization(Subjects(prefix), users.passwords))
        server.start()
        nats_url = server.url
        users.write(state_dir, nats_url)
        log.info(
            "embedded NATS with JetStream at %s (a user per role; their URLs in %s)",
            nats_url,
            url_file(state_dir, ADMIN).parent,
        )
    instances = plan_instances(topology, nats_url, prefix, gateway_env, users)
    stop = {"now": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    admin_url = users.url(nats_url, ADMIN) if users is not None else nats_url
    report = StartupReport(
        instances, topology, admin_url, prefix, state_dir if users is not None else None
    )
    try:
        for inst in instances:
            start(inst)
        report.start()
        gateway = topology.gateway
        log.info(
            "started %d instances; OpenAI API at http://%s:%d/v1",
            len(instances),
            gateway.host,
            gateway.port,
        )
        reported: set[str] = set()
        policy = RestartPolicy()
        while not stop["now"]:
            time.sleep(0.2)
            report.tick()
            if server is not None:
                keep_serving(server)
            for inst in instances:
                if inst.name in reported:
                    continue
                now = time.monotonic()
                if inst.restart_at is not None:
                    if now >= inst.restart_at:
                        log.warning("restarting %s (%s)", inst.name, inst.role)
                        start(inst)
                    continue
                rc = inst.process.poll() if inst.process else None
                if rc is None:
                    continue
                wait = policy.after_death(inst.name, now - inst.started_at) if restart else None
                if wait is None:
                    reported.add(inst.name)
                    log.error(
                        "%s (%s) exited with code %s%s; the others keep serving",
                        inst.name,
                        inst.role,
                        rc,
                        " again too soon, not restarted" if restart else "",
                    )
                else:
                    inst.restart_at = now + wait
                    log.warning(
                        "%s (%s) exited with code %s; restarting it in %.1fs",
                        inst.name,
                        inst.role,
                        rc,
                        wait,
                    )
            if len(reported) == len(instances):
                code = 1
                break
    finally:
        report.close()
        stop_all(instances)
        if server is not None:
            server.stop()
    return code
