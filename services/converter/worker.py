"""Converter: re-lays a KV stream from the prefill's layout into the decode's, layer by layer.

Frames of one request are handled in order by one task. A layer is converted as soon as
every source shard has delivered all its tokens, then sent on and dropped: the converter
never holds a request's whole cache. The frame that completes a layer is acknowledged only
after that layer went out, so a slow decode side slows the prefill side down instead of
filling the converter's memory.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from proto.frames import Frame, FrameError
from proto.kv_descriptor import KVDescriptor
from proto.messages import InstanceInfo
from services.common import metrics
from services.common.service import Service
from services.common.settings import ConverterSettings
from services.common.telemetry import extract, tracer
from services.kv.endpoint import Reply
from services.kv.nats_link import NatsLink, StreamFailed
from services.kv.relayout import UNIT_SCALES, Piece, ShardLayer, check_convertible, convert_layer
from services.kv.shard_stream import FRAME_HEADER_ROOM
from services.kv.stream import StreamReader, StreamWriter

log = logging.getLogger(__name__)
_tracer = tracer("hetserve.converter")


@dataclass
class Conversion:
    request_id: str
    readers: dict[int, StreamReader] = field(default_factory=dict)  # per source shard
    shards: int = 0  # the source's tensor-parallel size
    num_tokens: int = 0
    token_offset: int = 0  # the decode side holds the tokens before (a cached prefix)
    dest_instance: str = ""
    dest: KVDescriptor | None = None
    pieces: dict[int, dict[int, list[Piece]]] = field(default_factory=dict)  # layer, shard
    scales: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    ends: dict[int, Frame] = field(default_factory=dict)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    # one outgoing stream per tensor-parallel rank of the decode instance
    links: list[NatsLink] = field(default_factory=list)
    writers: list[StreamWriter] = field(default_factory=list)
    failed: str = ""

    def source(self, shard: int) -> KVDescriptor:
        desc = self.readers[shard].descriptor
        assert desc is not None
        return desc

    def layer_complete(self, layer: int) -> bool:
        return len(self.readers) == self.shards and all(
            r.layer_tokens.get(layer, 0) == self.num_tokens for r in self.readers.values()
        )

    @property
    def bytes_sent(self) -> int:
        return sum(link.bytes_sent for link in self.links)


class ConverterService(Service):
    role = "converter"
    moves_kv = True
    settings: ConverterSettings

    def __init__(self, settings: ConverterSettings):
        super().__init__(settings)
        self.active: dict[str, Conversion] = {}
        self.converted_bytes = 0

    async def start(self) -> None:
        endpoint = self.bus.kv_endpoint(self.instance_id, self._on_frame, self._on_rejected)
        await self.subscribe(self.bus.subjects.kv_frames(self.instance_id), endpoint)

    def status(self) -> InstanceInfo:
        info = super().status()
        info.running = len(self.active)
        return info

    async def _on_frame(self, frame: Frame, reply: Reply) -> None:
        conv = self.active.get(frame.request_id)
        if conv is None:
            if frame.kind != "begin":
                raise FrameError(f"frame for unknown request {frame.request_id!r}")
            conv = self.active[frame.request_id] = Conversion(frame.request_id)
            context = extract(reply.headers)
            self.spawn(self._convert_stream(conv, context), f"convert-{frame.request_id}")
        conv.inbox.put_nowait((frame, reply.keep()))

    async def _on_rejected(self, request_id: str | None, reason: str) -> None:
        broken = self.active.get(request_id or "")
        if broken is not None and not broken.failed:
            broken.failed = reason
            await self._abandon(broken)

    async def _convert_stream(self, conv: Conversion, context: object) -> None:
        with _tracer.start_as_current_span("converter.convert", context=context) as span:
            span.set_attribute("request.id", conv.request_id)
            span.set_attribute("instance.id", self.instance_id)
            try:
                while conv.request_id in self.active:
                    frame, reply = await conv.inbox.get()
                    if frame is None:  # forgotten after a failure
                        break
                    if conv.failed:
                        await reply.reject(conv.failed)
                        continue
                    try:
                        await self._take(conv, frame)
                    except (FrameError, ValueError, StreamFailed) as exc:
                        log.warning(
                            "%s: conversion of %s failed: %s",
                            self.instance_id,
                            conv.request_id,
                            exc,
                        )
                        conv.failed = str(exc)
                        metrics.error("converter", "conversion_failed")
                        await reply.reject(str(exc))
                        await self._abandon(conv)
                        continue
                    await reply.accept()
                if conv.readers and conv.dest is not None:
                    span.set_attribute("kv.layout.source", conv.source(min(conv.readers)).layout)
                    span.set_attribute("kv.layout.dest", conv.dest.layout)
                span.set_attribute("kv.bytes", conv.bytes_sent)
            finally:
                self.active.pop(conv.request_id, None)
                for link in conv.links:
                    await link.close()

    async def _abandon(self, conv: Conversion) -> None:
        """Tell the decode side the stream is dead so it frees its blocks; keep draining acks."""
        for writer in conv.writers:
            await writer.fail(conv.failed)
        # Later frames of this request are refused by `failed`; stop after a quiet period.
        self.spawn(self._forget_later(conv), f"forget-{conv.request_id}")

    async def _forget_later(self, conv: Conversion) -> None:
        await asyncio.sleep(self.settings.kv_ack_timeout_s)
        self.active.pop(conv.request_id, None)
        conv.inbox.put_nowait((None, None))

    async def _take(self, conv: Conversion, frame: Frame) -> None:
        reader = conv.readers.get(frame.shard)
        if reader is None:
            if frame.kind != "begin":
                raise FrameError(f"{frame.kind} for shard {frame.shard} before its begin")
            known = bool(conv.readers)  # later shards must agree with the first one
            reader = StreamReader(
                num_tokens=conv.num_tokens if known else None,
                token_offset=conv.token_offset if known else None,
            )
        reader.take(frame)
        if frame.kind == "begin":
            await self._begin(conv, frame, reader)
        elif frame.kind == "data":
            await self._data(conv, frame)
        else:
            await self._end(conv, frame)

    async def _begin(self, conv: Conversion, frame: Frame, reader: StreamReader) -> None:
        desc = frame.descriptor
        assert desc is not None
        if not frame.dest_instance or frame.dest_descriptor is None:
            raise FrameError("begin frame names no destination for the converted stream")
        if conv.readers and desc.tp_size != conv.shards:
            raise FrameError("shards disagree on the tensor-parallel size")
        if frame.shard != desc.tp_rank:
            raise FrameError(f"frame shard {frame.shard} but descriptor rank {desc.tp_rank}")
        check_convertible(desc, frame.dest_descriptor)
        conv.readers[frame.shard] = reader
        conv.shards, conv.num_tokens = desc.tp_size, frame.num_tokens
        conv.token_offset = frame.token_offset
        conv.dest_instance, conv.dest = frame.dest_instance, frame.dest_descriptor
        if len(conv.readers) < conv.shards:
            return
        for rank in range(conv.dest.tp_size):
            target = conv.dest.model_copy(update={"tp_rank": rank})
            link = self.bus.kv_link(conv.dest_instance, rank)
            await link.open()
            conv.links.append(link)
            conv.writers.append(StreamWriter(link, conv.request_id, target))
        for writer in conv.writers:
            if conv.token_offset % writer.kv.block_size:
                raise FrameError(
                    f"the stream starts at token {conv.token_offset}, inside a block of the "
                    f"destination's {writer.kv.block_size}"
                )
            await writer.begin(conv.num_tokens, token_offset=conv.token_offset)

    async def _data(self, conv: Conversion, frame: Frame) -> None:
        key = (frame.layer, frame.shard)
        if frame.scales is not None:
            conv.scales[key] = frame.scales
        by_shard = conv.pieces.setdefault(frame.layer, {})
        pieces = by_shard.setdefault(frame.shard, [])
        pieces.append((frame.token_start, frame.token_stop, frame.payload))
        if conv.layer_complete(frame.layer):
            await self._convert_layer(conv, frame.layer)
        elif isinstance(frame.payload, memoryview):
            # a staging slot (mooncake) is the sender's again once this frame is
            # acknowledged, before the layer is converted: keep a copy
            pieces[-1] = (frame.token_start, frame.token_stop, bytes(frame.payload))

    async def _convert_layer(self, conv: Conversion, layer: int) -> None:
        by_shard = conv.pieces.pop(layer)
        sources = [
            ShardLayer(conv.source(shard), pieces, conv.scales.get((layer, shard), UNIT_SCALES))
            for shard, pieces in sorted(by_shard.items())
        ]
        limit = self.bus.frame_limit - FRAME_HEADER_ROOM

        def convert() -> list[list]:
            return [
                convert_layer(
                    sources, writer.kv, conv.num_tokens, limit, layer=layer, first=conv.token_offset
                )
                for writer in conv.writers
            ]

        with metrics.CONVERSION_SECONDS.time():
            per_rank = await asyncio.to_thread(convert)
        for writer, pieces in zip(conv.writers, per_rank, strict=True):
            for start, stop, payload in pieces:
                self.converted_bytes += len(payload)
                metrics.KV_CONVERTED_BYTES.inc(len(payload))
                metrics.KV_CONVERTED_FRAMES.inc()
                await writer.data(layer, start, stop, payload)

    async def _end(self, conv: Conversion, frame: Frame) -> None:
        conv.ends[frame.shard] = frame
        if len(conv.ends) < conv.shards:
            return
        errors = [r.error for r in conv.readers.values() if r.error is not None]
        if errors:
            conv.failed = errors[0]
            for writer in conv.writers:
                await writer.fail(errors[0])
        else:
            first = conv.ends[min(conv.ends)]
            await asyncio.gather(
                *(writer.end(first.first_token, dict(first.extra)) for writer in conv.writers)
            )
        self.active.pop(conv.request_id, None)
        if not errors:
            metrics.CONVERSIONS.inc()
