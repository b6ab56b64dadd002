"""One process's Mooncake Transfer Engine: started once, memory registered with it, writes.

The `mooncake` package is imported here only, and only when the transport is chosen: an
install without the `[mooncake]` extra never needs it. The engine's calls block (a write
returns when the bytes are in the peer's memory), so async callers run them in a thread.
With the `P2PHANDSHAKE` metadata setting no metadata server is needed: a peer is named by
its session id, "host:rpc_port".
"""

from __future__ import annotations

import ctypes
import socket
import threading
from dataclasses import dataclass

import numpy


class MooncakeUnavailable(RuntimeError):
    """The transport was chosen but the engine cannot be imported or started."""


@dataclass(frozen=True)
class MooncakeConfig:
    host: str = ""  # the address peers reach this process at ("": this host's)
    protocol: str = "tcp"  # tcp, rdma, ... (the engine's transports)
    devices: str = ""  # device names for rdma, e.g. "mlx5_0,mlx5_1" ("": none / auto)


def import_engine() -> type:
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise MooncakeUnavailable(
            "kv_transport mooncake needs the transfer engine: pip install 'hetserve[mooncake]' "
            f"(and Debian's libibverbs1): {exc}"
        ) from exc
    return TransferEngine


def reachable_host() -> str:
    """This host's address as peers see it: its name's address, else loopback."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class RegisteredMemory:
    """A zeroed host buffer at a fixed address, as bytes."""

    def __init__(self, nbytes: int):
        self._array = (ctypes.c_ubyte * nbytes)()
        self.address = ctypes.addressof(self._array)
        self.view = memoryview(self._array).cast("B")
        self.nbytes = nbytes


class MooncakeEngine:
    """A started engine plus a registered send area, so that every write's source is
    registered memory where the protocol needs it (rdma); tcp writes straight from the
    payload's own memory, one copy fewer."""

    def __init__(self, config: MooncakeConfig, send_slot_bytes: int, send_slots: int = 4):
        engine_class = import_engine()
        self.engine = engine_class()
        host = config.host or reachable_host()
        rc = self.engine.initialize(host, "P2PHANDSHAKE", config.protocol, config.devices)
        if rc != 0:
            raise MooncakeUnavailable(f"transfer engine did not start on {host} ({rc})")
        self.session = f"{host}:{self.engine.get_rpc_port()}"
        self.copy_source = config.protocol != "tcp"
        self.send_slot_bytes = send_slot_bytes
        self._send = self.register(send_slot_bytes * send_slots)
        self._free = list(range(send_slots))
        self._free_lock = threading.Condition()

    def register(self, nbytes: int) -> RegisteredMemory:
        """Host memory the engine may write into (or read from), kept alive by the caller."""
        memory = RegisteredMemory(nbytes)
        rc = self.engine.register_memory(memory.address, nbytes)
        if rc != 0:
            raise MooncakeUnavailable(f"cannot register {nbytes} bytes with the engine ({rc})")
        return memory

    def unregister(self, memory: RegisteredMemory) -> None:
        self.engine.unregister_memory(memory.address)

    def write(self, session: str, payload: bytes | memoryview, remote_addr: int) -> int:
        """Blocking: copy `payload` into a send slot, write it to `remote_addr` of peer
        `session`. The engine's result: 0 when the bytes are there, negative when not."""
        nbytes = memoryview(payload).nbytes
        if nbytes > self.send_slot_bytes:
            raise ValueError(f"{nbytes} bytes exceed a send slot of {self.send_slot_bytes}")
        if not nbytes:
            return 0
        if not self.copy_source:
            source = numpy.frombuffer(payload, dtype=numpy.uint8)  # no copy; kept alive here
            return int(
                self.engine.transfer_sync_write(session, source.ctypes.data, remote_addr, nbytes)
            )
        slot = self._take_slot()
        try:
            start = slot * self.send_slot_bytes
            self._send.view[start : start + nbytes] = memoryview(payload).cast("B")
            src = self._send.address + start
            return int(self.engine.transfer_sync_write(session, src, remote_addr, nbytes))
        finally:
            self._give_slot(slot)

    def _take_slot(self) -> int:
        with self._free_lock:
            while not self._free:
                self._free_lock.wait()
            return self._free.pop()

    def _give_slot(self, slot: int) -> None:
        with self._free_lock:
            self._free.append(slot)
            self._free_lock.notify()
