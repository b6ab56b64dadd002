"""Bad KV frames against a real decode service and a real converter over a real nats-server:
each is refused with a precise reason, the request fails with that reason instead of hanging,
and the blocks reserved for it come back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgpack
import nats
import pytest

from proto.frames import Frame, encode_frame
from proto.kv_descriptor import KVDescriptor
from proto.messages import (
    ErrorEvent,
    GenerateRequest,
    ReserveReply,
    ReserveRequest,
    SamplingParams,
    unpack_request_event,
)
from proto.subjects import Subjects
from services.backends.native.decode import NativeDecode
from services.common.settings import ConverterSettings, WorkerSettings
from services.converter.worker import ConverterService
from services.decode.worker import DecodeService

PREFIX = "badframes"
SUBJECTS = Subjects(PREFIX)
DECODE, CONVERTER = "d-bad", "c-bad"


async def _serve(service) -> asyncio.Task:  # noqa: ANN001
    task = asyncio.create_task(service.run())
    nc = await nats.connect(service.settings.nats_url)
    try:
        for _ in range(200):
            try:
                await nc.request(SUBJECTS.stats(service.instance_id), b"", timeout=0.5)
                return task
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{service.instance_id} did not start")
    finally:
        await nc.close()


@pytest.fixture(scope="module")
async def services(nats_server, tiny_llama: Path) -> AsyncIterator[DecodeService]:  # noqa: ANN001
    common = {"nats_url": nats_server.url, "prefix": PREFIX}
    settings = WorkerSettings(
        **common,
        instance_id=DECODE,
        model=str(tiny_llama),
        kv_layout="vllm-flash",
        block_size=16,
        num_blocks=64,
        torch_threads=1,
    )
    decode = DecodeService(settings, NativeDecode(settings))
    converter = ConverterService(ConverterSettings(**common, instance_id=CONVERTER))
    tasks = [await _serve(decode), await _serve(converter)]
    yield decode
    decode.stopping.set()
    converter.stopping.set()
    await asyncio.gather(*tasks)


@pytest.fixture
async def nc(nats_server) -> AsyncIterator[nats.NATS]:  # noqa: ANN001
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


def descriptor(decode: DecodeService) -> KVDescriptor:
    return decode.backend.kv


async def reserve(nc: nats.NATS, rid: str, hold_s: float = 30.0) -> asyncio.Queue:
    """Reserve like the scheduler does; return the queue of the request's events."""
    events: asyncio.Queue = asyncio.Queue()

    async def on_event(msg) -> None:  # noqa: ANN001
        events.put_nowait(unpack_request_event(msg.data))

    await nc.subscribe(SUBJECTS.request_events(rid), cb=on_event)
    request = GenerateRequest(
        request_id=rid, prompt_token_ids=list(range(5, 45)), sampling=SamplingParams(max_tokens=8)
    )
    reply = await nc.request(
        SUBJECTS.reserve(DECODE),
        ReserveRequest(request=request, num_tokens=48, hold_seconds=hold_s).pack(),
        timeout=5,
    )
    assert ReserveReply.unpack(reply.data).ok
    return events


async def send(nc: nats.NATS, receiver: str, data: bytes) -> dict:
    reply = await nc.request(SUBJECTS.kv_frames(receiver), data, timeout=5)
    return msgpack.unpackb(reply.data)


def begin(desc: KVDescriptor, rid: str, **extra: object) -> bytes:
    return encode_frame(
        Frame(
            kind="begin",
            request_id=rid,
            seq=0,
            shard=0,
            layout_id=desc.id,
            descriptor=desc,
            num_tokens=40,
            **extra,
        )
    )


def data(desc: KVDescriptor, rid: str, seq: int = 1, **overrides: object) -> Frame:
    fields = dict(
        kind="data",
        request_id=rid,
        seq=seq,
        shard=0,
        layout_id=desc.id,
        layer=0,
        token_start=0,
        token_stop=16,
        payload=bytes(desc.payload_nbytes(1)),
    )
    fields.update(overrides)
    return Frame(**fields)


def tampered(frame: Frame, **header: object) -> bytes:
    head, payload = msgpack.unpackb(encode_frame(frame), raw=False)
    head.update(header)
    return msgpack.packb([head, payload], use_bin_type=True)


CASES: list[tuple[str, Callable[[KVDescriptor, str], list[bytes]], str]] = [
    ("truncated payload", lambda d, r: [tampered(data(d, r), n=99999)], "truncated payload"),
    ("wrong checksum", lambda d, r: [tampered(data(d, r), xxh=12345)], "checksum mismatch"),
    (
        "unknown layout",
        lambda d, r: [encode_frame(data(d, r, layout_id="0" * 12))],
        "is not this instance's",
    ),
    (
        "shape not matching the descriptor",
        lambda d, r: [encode_frame(data(d, r, payload=b"x" * 100))],
        "payload is 100 bytes",
    ),
    (
        "out-of-order sequence number",
        lambda d, r: [encode_frame(data(d, r, seq=5))],
        "sequence number 5, expected 1",
    ),
    (
        "duplicate sequence number",
        lambda d, r: [
            encode_frame(data(d, r)),
            encode_frame(data(d, r, token_start=16, token_stop=32)),
        ],
        "sequence number 1, expected 2",
    ),
    (
        "tokens that skip a block",
        lambda d, r: [encode_frame(data(d, r, token_start=16, token_stop=32))],
        "do not continue",
    ),
]


@pytest.mark.parametrize(("name", "frames", "reason"), CASES, ids=[c[0] for c in CASES])
async def test_decode_refuses_bad_frame_and_fails_the_request(
    services: DecodeService, nc: nats.NATS, name: str, frames: Callable, reason: str
) -> None:
    desc = descriptor(services)
    rid = "bad-" + name.replace(" ", "-")
    events = await reserve(nc, rid)
    assert (await send(nc, DECODE, begin(desc, rid)))["ok"]
    acks = [await send(nc, DECODE, raw) for raw in frames(desc, rid)]
    assert acks[-1]["ok"] is False and reason in acks[-1]["reason"], acks
    event = await asyncio.wait_for(events.get(), 5)
    assert isinstance(event, ErrorEvent) and reason in event.message
    stats = services.status()
    assert stats.free_blocks == stats.total_blocks


async def test_frame_for_unknown_request_is_refused(services: DecodeService, nc: nats.NATS) -> None:
    desc = descriptor(services)
    ack = await send(nc, DECODE, encode_frame(data(desc, "nobody", seq=0)))
    assert ack == {"ok": False, "reason": "frame for unknown request 'nobody'"}
    ack = await send(nc, CONVERTER, encode_frame(data(desc, "nobody", seq=0)))
    assert ack["ok"] is False and "unknown request" in ack["reason"]


async def test_unreadable_frame_fails_the_request_when_its_kv_never_completes(
    services: DecodeService, nc: nats.NATS
) -> None:
    desc = descriptor(services)
    events = await reserve(nc, "garbled", hold_s=1.0)
    ack = await send(nc, DECODE, encode_frame(data(desc, "garbled"))[:-7])
    assert ack["ok"] is False and "not a msgpack frame" in ack["reason"]
    event = await asyncio.wait_for(events.get(), 5)
    assert isinstance(event, ErrorEvent) and "did not complete in time" in event.message
    assert services.status().free_blocks == services.status().total_blocks


async def test_bad_frame_at_the_converter_frees_the_decode_side(
    services: DecodeService, nc: nats.NATS
) -> None:
    source = KVDescriptor(
        layout="ascend",
        block_size=128,
        dtype="float32",
        num_layers=desc_layers(services),
        num_kv_heads=2,
        head_dim=32,
    )
    await reserve(nc, "via-converter")
    ack = await send(
        nc,
        CONVERTER,
        begin(source, "via-converter", dest_instance=DECODE, dest_descriptor=descriptor(services)),
    )
    assert ack["ok"]
    await asyncio.sleep(0.2)
    assert services.status().free_blocks < services.status().total_blocks
    bad = tampered(
        data(source, "via-converter", token_stop=40, payload=bytes(source.payload_nbytes(1))), xxh=1
    )
    ack = await send(nc, CONVERTER, bad)
    assert ack["ok"] is False and "checksum mismatch" in ack["reason"]
    for _ in range(50):  # the converter ends the decode stream with the error
        if services.status().free_blocks == services.status().total_blocks:
            break
        await asyncio.sleep(0.1)
    assert services.status().free_blocks == services.status().total_blocks


def desc_layers(decode: DecodeService) -> int:
    return decode.backend.kv.num_layers
