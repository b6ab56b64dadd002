"""A whole hetserve system for a benchmark: `hetserve up` on a topology in a subprocess, ready
when /health says so, its Prometheus counters summed over every process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.common.bus_users import read_url
from services.common.nats_server import free_port, free_port_range


@dataclass
class System:
    port: int
    metrics_ports: range  # every process's Prometheus port (hetserve up counts them up)
    process: subprocess.Popen
    log_path: Path
    prefix: str = "hetserve"
    state_dir: Path | None = None  # the embedded NATS server's per-role URLs
    nats_url: str | None = None  # the external server(s) it runs on, if not embedded

    @property
    def admin_url(self) -> str:
        """The NATS URL with the admin role's credentials (an external server's own URL)."""
        if self.nats_url is not None:
            return self.nats_url
        assert self.state_dir is not None
        url = read_url(self.state_dir)
        if url is None:
            raise RuntimeError(f"no admin URL in {self.state_dir}")
        return url

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def counter(self, name: str) -> float:
        """A counter summed over every process (0 where a process does not have it)."""
        total = 0.0
        for port in self.metrics_ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except (urllib.error.URLError, OSError):
                continue
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name == name:
                        total += sample.value
        return total


def wait_healthy(
    port: int,
    timeout_s: float,
    process: subprocess.Popen | None = None,
    log_path: Path | None = None,
) -> None:
    """Until the gateway on `port` answers /health with 200; fails early if `process` (the
    `hetserve up` running it) exits, with the end of its log."""

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-4000:] if log_path else ""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"hetserve up exited early:\n{log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"system not healthy in {timeout_s:.0f}s:\n{log_tail()}")


@contextmanager
def running(
    topology: dict,
    env: dict[str, str] | None = None,
    timeout_s: float = 600.0,
    settle_s: float = 3.0,
    up_args: list[str] | None = None,
    nats_url: str | None = None,
) -> Iterator[System]:
    """`hetserve up` with an embedded NATS server until the block ends. `env` reaches every
    process (HETSERVE_* settings); `up_args`: more `hetserve up` options; `nats_url`: run on
    these servers instead (a cluster's URLs, comma-separated). Processes get
    metrics ports counted up from the first of a free range."""
    workdir = Path(tempfile.mkdtemp(prefix="hetserve-bench-"))
    state_dir = workdir / "state"
    count = (
        sum(
            spec.get("replicas", 1) * spec.get("tp", 1)
            for role in ("prefill", "decode", "both")
            for spec in topology.get(role, [])
        )
        + 8
    )  # scheduler, converters, gateways: a margin is harmless
    port, metrics = free_port(), free_port_range(count)
    topology = {**topology, "gateway": {**topology.get("gateway", {}), "port": port}}
    path = workdir / "topology.yaml"
    path.write_text(yaml.safe_dump(topology))
    log_path = workdir / "system.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "--log-level", "WARNING", "up",
             "--topology", str(path), "--state-dir", str(state_dir), *(up_args or []),
             *(["--nats-url", nats_url] if nats_url else [])],
            env={**os.environ, "HETSERVE_METRICS_PORT": str(metrics), **(env or {})},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_healthy(port, timeout_s, process, log_path)
        time.sleep(settle_s)  # every instance heartbeats at least once more
        metrics_ports = range(metrics, metrics + count)
        yield System(port, metrics_ports, process, log_path, state_dir=state_dir, nats_url=nats_url)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
