"""The `mooncake` transport's pieces against a real nats-server and real transfer engines (two
in this process, tcp, P2P handshake): staged payloads arrive checked and intact through slot
reuse, a full staging area falls back to inline payloads, a failed write fails the stream
with its reason and frees the slots, a staged frame for a stream that holds no slot is
refused, a write to a receiver process that died fails at once."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgpack
import nats
import nats.errors
import pytest

from proto.frames import Frame, FrameError, decode_frame, encode_frame
from proto.kv_descriptor import KVDescriptor
from services.kv.endpoint import FrameEndpoint, Reply
from services.kv.nats_link import StreamFailed
from services.kv.stream import StreamWriter

try:
    from services.kv.mooncake_engine import MooncakeConfig, MooncakeEngine, import_engine

    import_engine()
except Exception as exc:  # noqa: BLE001 - MooncakeUnavailable: the only reason to skip
    pytest.skip(f"the mooncake package cannot be imported: {exc}", allow_module_level=True)

from services.kv.mooncake_link import MooncakeLink  # noqa: E402
from services.kv.mooncake_staging import StagingArea  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SLOT = 64 * 1024
KV = KVDescriptor(
    layout="vllm-flash", num_layers=2, num_kv_heads=2, head_dim=32, block_size=16, dtype="float32"
)


@pytest.fixture(scope="module")
def engines() -> tuple[MooncakeEngine, MooncakeEngine]:
    config = MooncakeConfig(host="127.0.0.1")
    return MooncakeEngine(config, SLOT, 2), MooncakeEngine(config, SLOT, 2)


@pytest.fixture
def area(engines) -> Iterator[Callable[..., StagingArea]]:  # noqa: ANN001
    """Staging areas in the receiving engine, unregistered after the test."""
    made: list[StagingArea] = []

    def make(slots: int, **kw: float) -> StagingArea:
        made.append(StagingArea(engines[1], slots * SLOT, SLOT, **kw))
        return made[-1]

    yield make
    for staging in made:
        staging.close()


class Receiver:
    """A FrameEndpoint on a subject whose handler keeps copies of the payloads."""

    def __init__(self, staging: StagingArea | None):
        self.payloads: list[bytes] = []
        self.rejected: list[str] = []
        self.endpoint = FrameEndpoint(
            "test receiver", lambda: 1 << 20, self._handle, self._rejected, staging=staging
        )

    async def _handle(self, frame: Frame, reply: Reply) -> None:
        if frame.kind == "data":
            self.payloads.append(bytes(frame.payload))

    async def _rejected(self, request_id: str | None, reason: str) -> None:
        self.rejected.append(reason)


@pytest.fixture
async def nc(nats_server) -> AsyncIterator[nats.aio.client.Client]:  # noqa: ANN001
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


async def _stream(
    nc, sender: MooncakeEngine, staging: StagingArea | None, payloads: list[bytes], **kw
) -> tuple[MooncakeLink, Receiver]:  # noqa: ANN001
    receiver = Receiver(staging)
    subject = nc.new_inbox()

    async def on_frame(msg) -> None:  # noqa: ANN001 - nats-py takes coroutine functions only
        await receiver.endpoint(msg)

    await nc.subscribe(subject, cb=on_frame)
    link = MooncakeLink(nc, subject, "test receiver", 2, 5.0, sender, **kw)
    await link.open()
    writer = StreamWriter(link, "r1", KV)
    try:
        await writer.begin(16 * len(payloads) // 2)
        for i, payload in enumerate(payloads):
            await writer.data(i % 2, 16 * (i // 2), 16 * (i // 2 + 1), payload)
        await writer.end(first_token=3)
    except StreamFailed:
        await writer.fail("write failed")
        await asyncio.sleep(0.2)
        raise
    finally:
        await link.close()
    return link, receiver


def _payloads(count: int) -> list[bytes]:
    size = KV.payload_nbytes(1)
    return [bytes([i + 1]) * size for i in range(count)]


@pytest.mark.parametrize("copy_source", [False, True], ids=["from-payload", "via-send-area"])
async def test_payloads_arrive_staged_through_reused_slots(nc, engines, area, copy_source) -> None:  # noqa: ANN001
    """From the payload's memory (tcp), or copied into the registered send area (rdma)."""
    sender = engines[0]
    sender.copy_source = copy_source
    staging = area(4)
    payloads = _payloads(8)  # 8 frames through a window of 2 slots
    link, receiver = await _stream(nc, sender, staging, payloads)
    assert receiver.payloads == payloads and not receiver.rejected
    assert link.bytes_staged == sum(map(len, payloads))
    assert staging.free_slots == staging.num_slots  # the end gave the lease back
    sender.copy_source = False


async def test_a_full_staging_area_sends_inline(nc, engines, area) -> None:  # noqa: ANN001
    sender = engines[0]
    staging = area(1)
    staging.lease(("someone else", 0), 1)  # takes the only slot
    payloads = _payloads(4)
    link, receiver = await _stream(nc, sender, staging, payloads)
    assert receiver.payloads == payloads and link.bytes_staged == 0


async def test_a_failed_write_fails_the_stream_and_frees_its_slots(nc, engines, area) -> None:  # noqa: ANN001
    sender = engines[0]
    staging = area(4, grace_s=0.0)
    with pytest.raises(StreamFailed, match="transfer-engine write .* failed"):
        await _stream(nc, sender, staging, _payloads(4), fail_write_after=1)
    assert staging.free_slots == staging.num_slots and not staging.leases


def test_a_staged_frame_needs_a_leased_slot(area) -> None:  # noqa: ANN001
    staging = area(2)
    frame = Frame("data", "r1", 1, 0, KV.id, layer=0, token_start=0, token_stop=16, payload=b"x")
    data = encode_frame(frame, at=0)
    with pytest.raises(FrameError, match="not leased"):
        decode_frame(data, 1 << 20, staging.view)
    with pytest.raises(FrameError, match="this receiver has none"):
        decode_frame(data, 1 << 20)
    lease = staging.lease(("r1", 0), 1)
    (slot, address), *_ = lease["slots"]
    staging.buffer.view[address - staging.base] = ord("y")  # not what the checksum says
    with pytest.raises(FrameError, match="checksum"):
        decode_frame(encode_frame(frame, at=slot), 1 << 20, staging.view)


def test_the_staging_area_is_bounded(area) -> None:  # noqa: ANN001
    staging = area(3)
    assert len(staging.lease(("a", 0), 2)["slots"]) == 2
    assert len(staging.lease(("b", 0), 2)["slots"]) == 1
    assert staging.lease(("c", 0), 2)["slots"] == []
    staging.release(("a", 0))
    assert msgpack.unpackb(msgpack.packb(staging.lease(("c", 0), 2)))["slots"]


async def peer_address(
    client: nats.NATS, subject: str, peer: asyncio.subprocess.Process, wait_s: float = 180.0
) -> dict:
    """The echo peer's session and buffer address, once it answers (it imports torch and the
    transfer engine first, slow on a loaded machine)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if peer.returncode is not None:
            pytest.fail(f"the echo peer exited with code {peer.returncode} before answering")
        try:
            return msgpack.unpackb((await client.request(subject, b"", timeout=1.0)).data)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            await asyncio.sleep(0.2)
    pytest.fail(f"the echo peer did not answer on {subject} within {wait_s:.0f}s")


async def test_a_write_to_a_dead_peer_fails_at_once(nats_server, engines) -> None:  # noqa: ANN001
    """A receiver process that died: the engine refuses the write (no hang), which the link
    turns into a failed stream (the test above)."""
    subject = f"test.sink.{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "services.bench.kv_mooncake_echo", nats_server.url, subject]
    peer = await asyncio.create_subprocess_exec(
        *argv, str(SLOT), cwd=ROOT, stderr=asyncio.subprocess.DEVNULL
    )
    client = await nats.connect(nats_server.url)
    try:
        where = await peer_address(client, subject, peer)
        sender = engines[0]
        assert sender.write(where["session"], b"x" * 1024, where["address"]) == 0
        peer.kill()
        await peer.wait()
        started = time.monotonic()
        assert sender.write(where["session"], b"x" * 1024, where["address"]) != 0
        assert time.monotonic() - started < 5
    finally:
        await client.close()
        if peer.returncode is None:
            peer.kill()
            await peer.wait()
