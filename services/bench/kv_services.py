"""The real services `bench kv` measures, each its own OS process as under `hetserve up`.

    prefill  (source layout)  -> decode-direct (source layout)          the direct route
                              -> converter -> decode-conv (target layout) the converter route
    echo: acknowledges frames and nothing else (the raw NATS ceiling)
    mooncake_echo (kv_transport mooncake): a transfer engine's registered memory and nothing
          else (the Mooncake ceiling)

Instance ids carry a random prefix, so a run can share a NATS server with a live system.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import nats.errors

from proto.kv_descriptor import KVDescriptor
from proto.messages import InstanceInfo
from services.common.bus import Bus
from services.common.settings import CommonSettings
from services.models.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
ROLES = {
    "prefill": "prefill",
    "direct": "decode",
    "conv_decode": "decode",
    "converter": "converter",
}


class ServicesFailed(RuntimeError):
    """A service (or the echo) exited or never answered."""


@dataclass(frozen=True)
class TopologyConfig:
    nats_url: str
    model_dir: Path
    log_dir: Path
    source_layout: str  # prefill and the decode it feeds directly
    target_layout: str  # the decode behind the converter
    source_block: int
    target_block: int
    kv_dtype: str = "float32"
    max_frame_bytes: int = 512 * 1024
    kv_window: int = 8
    num_blocks: int = 1024
    kv_transport: str = "nats"
    kv_ack_timeout_s: float = 30.0
    prefix: str = field(default_factory=lambda: f"kvb{uuid.uuid4().hex[:8]}")

    def settings(self) -> CommonSettings:
        """What the bench's own connection (the synthetic prefill side) runs with."""
        return CommonSettings(
            nats_url=self.nats_url,
            prefix=self.prefix,
            max_frame_bytes=self.max_frame_bytes,
            kv_window=self.kv_window,
            kv_transport=self.kv_transport,
            kv_ack_timeout_s=self.kv_ack_timeout_s,
        )


def build_tiny_model(out_dir: Path) -> Path:
    """The demo's tiny model (services/models/tiny)."""
    return make_tiny_model(out_dir, arch="llama")


class BenchTopology:
    """Start with `async with`; `ids`, `info` (stats replies) and `bus` are ready inside."""

    def __init__(self, config: TopologyConfig):
        self.config = config
        self.ids = {name: f"{config.prefix}-{name.replace('_', '-')}" for name in ROLES}
        self.ids["echo"] = f"{config.prefix}-echo"
        self.info: dict[str, InstanceInfo] = {}
        self.mooncake_sink: dict = {}  # where the Mooncake ceiling writes (mooncake only)
        self.bus: Bus
        self._procs: dict[str, subprocess.Popen] = {}

    def _env(self, name: str) -> dict[str, str]:
        c = self.config
        env = {
            "HETSERVE_NATS_URL": c.nats_url,
            "HETSERVE_PREFIX": c.prefix,
            "HETSERVE_INSTANCE_ID": self.ids[name],
            "HETSERVE_LOG_LEVEL": "WARNING",
            "HETSERVE_MAX_FRAME_BYTES": str(c.max_frame_bytes),
            "HETSERVE_KV_WINDOW": str(c.kv_window),
            "HETSERVE_KV_TRANSPORT": c.kv_transport,
        }
        if ROLES[name] in ("prefill", "decode"):
            target = name == "conv_decode"
            env.update(
                {
                    "HETSERVE_MODEL": str(c.model_dir),
                    "HETSERVE_ENGINE": "native",
                    "HETSERVE_KV_LAYOUT": c.target_layout if target else c.source_layout,
                    "HETSERVE_BLOCK_SIZE": str(c.target_block if target else c.source_block),
                    "HETSERVE_KV_DTYPE": c.kv_dtype,
                    "HETSERVE_NUM_BLOCKS": str(c.num_blocks),
                    "HETSERVE_DEVICE": "cpu",
                    "HETSERVE_TORCH_THREADS": "1",  # as `hetserve up`
                }
            )
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.config.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - child owns it
        try:
            self._procs[name] = subprocess.Popen(
                [sys.executable, *argv],
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()

    def kv(self, name: str) -> KVDescriptor:
        """The KV descriptor an instance announced (prefill, direct, conv_decode)."""
        kv = self.info[name].kv
        if kv is None:
            raise RuntimeError(f"{name} announced no KV descriptor")
        return kv

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.config.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    async def __aenter__(self) -> BenchTopology:
        try:
            for name, role in ROLES.items():
                self._spawn(name, ["-m", "services.cli", "serve", role], self._env(name))
            c = self.config
            subject = c.settings().subjects.kv_frames(self.ids["echo"])
            self._spawn("echo", ["-m", "services.bench.kv_echo", c.nats_url, subject], {})
            sinks = {"echo": subject}
            if c.kv_transport == "mooncake":
                sinks["mooncake_echo"] = f"{subject}.mooncake"
                nbytes = str(c.kv_window * c.max_frame_bytes)
                argv = ["-m", "services.bench.kv_mooncake_echo", c.nats_url, sinks["mooncake_echo"]]
                self._spawn("mooncake_echo", [*argv, nbytes], {})
            self.bus = await Bus.connect(c.settings(), name="kv-bench")
            await self.bus.start_kv_transport()
            await self._wait_ready(sinks)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _wait_ready(self, sinks: dict[str, str], timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        pending = {**{n: self.bus.subjects.stats(self.ids[n]) for n in ROLES}, **sinks}
        while pending:
            for name, subject in list(pending.items()):
                proc = self._procs[name]
                if proc.poll() is not None:
                    raise ServicesFailed(
                        f"{name} exited with code {proc.returncode}:\n{self.log_tail(name)}"
                    )
                try:
                    reply = await self.bus.nc.request(subject, b"probe", timeout=0.5)
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    continue
                if name == "mooncake_echo":
                    self.mooncake_sink = msgpack.unpackb(reply.data)
                elif name != "echo":
                    self.info[name] = InstanceInfo.unpack(reply.data)
                del pending[name]
            if pending and time.monotonic() > deadline:
                raise ServicesFailed(f"{', '.join(pending)} not ready in {timeout_s:.0f}s")
            if pending:
                await asyncio.sleep(0.3)

    async def __aexit__(self, *exc_info: object) -> None:
        if hasattr(self, "bus"):
            await self.bus.close()
        await asyncio.to_thread(self._stop_processes)

    def _stop_processes(self, timeout_s: float = 15.0) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self._procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
