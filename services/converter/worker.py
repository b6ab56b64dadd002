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

from nats.aio.msg import Msg

from proto.frames import Frame, FrameError, decode_frame
from proto.kv_descriptor import KVDescriptor
from services.common import metrics
from services.common.kv_stream import FrameSender, StreamFailed, acknowledge
from services.common.service import Service
from services.common.settings import ConverterSettings
from services.common.telemetry import extract, tracer
from services.kv.relayout import UNIT_SCALES, ShardLayer, check_convertible, convert_layer

log = logging.getLogger(__name__)
_tracer = tracer("hetserve.converter")


@dataclass
class Conversion:
    request_id: str
    sources: dict[int, KVDescriptor] = field(default_factory=dict)  # shard -> descriptor
    dest_instance: str = ""
    dest: KVDescriptor | None = None
    num_tokens: int = 0
    next_seq: dict[int, int] = field(default_factory=dict)
    pieces: dict[int, dict[int, list]] = field(default_factory=dict)  # layer -> shard -> pieces
    tokens: dict[tuple[int, int], int] = field(default_factory=dict)  # (layer, shard) -> tokens
    data_frames: dict[int, int] = field(default_factory=dict)
    ends: dict[int, Frame] = field(default_factory=dict)
    scales: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    # one outgoing stream per tensor-parallel rank of the decode instance
    targets: list[KVDescriptor] = field(default_factory=list)
    senders: list[FrameSender] = field(default_factory=list)
    out_seq: list[int] = field(default_factory=list)
    out_frames: list[int] = field(default_factory=list)
    failed: str = ""

    @property
    def shards(self) -> int:
        return next(iter(self.sources.values())).tp_size if self.sources else 0

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.senders)


class ConverterService(Service):
    role = "converter"
    settings: ConverterSettings

    def __init__(self, settings: ConverterSettings):
        super().__init__(settings)
        self.active: dict[str, Conversion] = {}
        self.converted_bytes = 0

    async def start(self) -> None:
        await self.subscribe(self.bus.subjects.kv_frames(self.instance_id), self._on_frame)

    def status(self):  # noqa: ANN201
        info = super().status()
        info.running = len(self.active)
        return info

    async def _on_frame(self, msg: Msg) -> None:
        try:
            frame = decode_frame(msg.data, self.bus.nc.max_payload)
        except FrameError as exc:
            log.warning(
                "%s rejected a KV frame of %s: %s",
                self.instance_id,
                exc.request_id or "an unknown request",
                exc,
            )
            await acknowledge(msg, False, str(exc))
            broken = self.active.get(exc.request_id or "")
            if broken is not None and not broken.failed:
                broken.failed = str(exc)
                await self._abandon(broken)
            return
        conv = self.active.get(frame.request_id)
        if conv is None:
            if frame.kind != "begin":
                reason = f"frame for unknown request {frame.request_id!r}"
                log.warning("%s rejected a KV frame: %s", self.instance_id, reason)
                await acknowledge(msg, False, reason)
                return
            conv = self.active[frame.request_id] = Conversion(frame.request_id)
            self.spawn(
                self._convert_stream(conv, extract(msg.headers)), f"convert-{frame.request_id}"
            )
        conv.inbox.put_nowait((frame, msg))

    async def _convert_stream(self, conv: Conversion, ctx) -> None:  # noqa: ANN001
        with _tracer.start_as_current_span("converter.convert", context=ctx) as span:
            span.set_attribute("request.id", conv.request_id)
            span.set_attribute("instance.id", self.instance_id)
            try:
                while conv.request_id in self.active:
                    frame, msg = await conv.inbox.get()
                    if frame is None:  # forgotten after a failure
                        break
                    if conv.failed:
                        await acknowledge(msg, False, conv.failed)
                        continue
                    try:
                        await self._take(conv, frame, msg)
                    except (FrameError, ValueError, StreamFailed) as exc:
                        log.warning(
                            "%s: conversion of %s failed: %s",
                            self.instance_id,
                            conv.request_id,
                            exc,
                        )
                        conv.failed = str(exc)
                        metrics.error("converter", "conversion_failed")
                        await acknowledge(msg, False, str(exc))
                        await self._abandon(conv)
                if conv.sources and conv.dest is not None:
                    src = next(iter(conv.sources.values()))
                    span.set_attribute("kv.layout.source", src.layout)
                    span.set_attribute("kv.layout.dest", conv.dest.layout)
                span.set_attribute("kv.bytes", conv.bytes_sent)
            finally:
                self.active.pop(conv.request_id, None)
                for sender in conv.senders:
                    await sender.__aexit__(None, None, None)

    async def _abandon(self, conv: Conversion) -> None:
        """Tell the decode side the stream is dead so it frees its blocks; keep draining acks."""
        for rank, sender in enumerate(conv.senders):
            try:
                await sender.send(self._end_frame(conv, rank, None, {"error": conv.failed}))
            except StreamFailed:
                pass
        # Later frames of this request are refused by `failed`; stop after a quiet period.
        self.spawn(self._forget_later(conv), f"forget-{conv.request_id}")

    async def _forget_later(self, conv: Conversion) -> None:
        await asyncio.sleep(self.settings.kv_ack_timeout_s)
        self.active.pop(conv.request_id, None)
        conv.inbox.put_nowait((None, None))

    async def _take(self, conv: Conversion, frame: Frame, msg: Msg) -> None:
        expected = conv.next_seq.get(frame.shard, 0)
        if frame.seq != expected:
            raise FrameError(
                f"shard {frame.shard}: sequence number {frame.seq}, expected {expected}"
            )
        conv.next_seq[frame.shard] = expected + 1
        if frame.kind == "begin":
            await self._begin(conv, frame)
            await acknowledge(msg)
        elif frame.kind == "data":
            await self._data(conv, frame, msg)
        else:
            await self._end(conv, frame)
            await acknowledge(msg)

    async def _begin(self, conv: Conversion, frame: Frame) -> None:
        desc = frame.descriptor
        assert desc is not None
        if frame.shard in conv.sources:
            raise FrameError(f"duplicate begin for shard {frame.shard}")
        if not frame.dest_instance or frame.dest_descriptor is None:
            raise FrameError("begin frame names no destination for the converted stream")
        if conv.sources and (desc.tp_size != conv.shards or frame.num_tokens != conv.num_tokens):
            raise FrameError("shards disagree on tp size or prompt length")
        if frame.shard != desc.tp_rank:
            raise FrameError(f"frame shard {frame.shard} but descriptor rank {desc.tp_rank}")
        check_convertible(desc, frame.dest_descriptor)
        conv.sources[frame.shard] = desc
        conv.dest_instance, conv.dest = frame.dest_instance, frame.dest_descriptor
        conv.num_tokens = frame.num_tokens
        if len(conv.sources) < conv.shards:
            return
        dest = conv.dest
        conv.targets = [dest.model_copy(update={"tp_rank": r}) for r in range(dest.tp_size)]
        for target in conv.targets:
            sender = FrameSender(
                self.bus,
                conv.dest_instance,
                self.settings.kv_window,
                self.settings.kv_ack_timeout_s,
                rank=target.tp_rank,
            )
            await sender.__aenter__()
            conv.senders.append(sender)
            conv.out_seq.append(0)
            conv.out_frames.append(0)
            await sender.send(
                Frame(
                    kind="begin",
                    request_id=conv.request_id,
                    seq=0,
                    shard=target.tp_rank,
                    layout_id=target.id,
                    descriptor=target,
                    num_tokens=conv.num_tokens,
                )
            )

    def _end_frame(self, conv: Conversion, rank: int, first: int | None, extra: dict) -> Frame:
        conv.out_seq[rank] += 1
        return Frame(
            kind="end",
            request_id=conv.request_id,
            seq=conv.out_seq[rank],
            shard=rank,
            layout_id=conv.targets[rank].id,
            data_frames=conv.out_frames[rank],
            first_token=first,
            extra=extra,
        )

    async def _data(self, conv: Conversion, frame: Frame, msg: Msg) -> None:
        src = conv.sources.get(frame.shard)
        if src is None:
            raise FrameError(f"data for shard {frame.shard} before its begin")
        if frame.layer not in src.layers:
            raise FrameError(f"layer {frame.layer} outside {src.layers}")
        key = (frame.layer, frame.shard)
        have = conv.tokens.get(key, 0)
        if frame.token_start != have or frame.token_stop > conv.num_tokens:
            raise FrameError(
                f"layer {frame.layer}: tokens [{frame.token_start}, "
                f"{frame.token_stop}) do not continue [0, {have})"
            )
        conv.tokens[key] = frame.token_stop
        if frame.scales is not None:
            conv.scales[key] = frame.scales
        conv.data_frames[frame.shard] = conv.data_frames.get(frame.shard, 0) + 1
        conv.pieces.setdefault(frame.layer, {}).setdefault(frame.shard, []).append(
            (frame.token_start, frame.token_stop, frame.payload)
        )
        complete = len(conv.sources) == conv.shards and all(
            conv.tokens.get((frame.layer, s), 0) == conv.num_tokens for s in conv.sources
        )
        if not complete:
            await acknowledge(msg)
            return
        await self._convert_layer(conv, frame.layer)
        await acknowledge(msg)

    async def _convert_layer(self, conv: Conversion, layer: int) -> None:
        by_shard = conv.pieces.pop(layer)
        sources = [
            ShardLayer(conv.sources[shard], pieces, conv.scales.get((layer, shard), UNIT_SCALES))
            for shard, pieces in sorted(by_shard.items())
        ]
        limit = self.bus.frame_limit - 1024  # room for the frame header

        def convert() -> list[list]:
            return [
                convert_layer(sources, target, conv.num_tokens, limit, layer=layer)
                for target in conv.targets
            ]

        with metrics.CONVERSION_SECONDS.time():
            per_rank = await asyncio.to_thread(convert)
        for rank, pieces in enumerate(per_rank):
            target = conv.targets[rank]
            for start, stop, payload in pieces:
                conv.out_seq[rank] += 1
                conv.out_frames[rank] += 1
                self.converted_bytes += len(payload)
                metrics.KV_CONVERTED_BYTES.inc(len(payload))
                metrics.KV_CONVERTED_FRAMES.inc()
                await conv.senders[rank].send(
                    Frame(
                        kind="data",
                        request_id=conv.request_id,
                        seq=conv.out_seq[rank],
                        shard=rank,
                        layout_id=target.id,
                        layer=layer,
                        token_start=start,
                        token_stop=stop,
                        payload=payload,
                    )
                )

    async def _end(self, conv: Conversion, frame: Frame) -> None:
        if frame.shard not in conv.sources:
            raise FrameError(f"end for shard {frame.shard} before its begin")
        if "error" not in frame.extra and frame.data_frames != conv.data_frames.get(frame.shard, 0):
            raise FrameError(
                f"shard {frame.shard}: end says {frame.data_frames} data frames, "
                f"{conv.data_frames.get(frame.shard, 0)} came"
            )
        conv.ends[frame.shard] = frame
        if len(conv.ends) < conv.shards:
            return
        errors = [f.extra["error"] for f in conv.ends.values() if "error" in f.extra]
        first = conv.ends[min(conv.ends)]
        extra = {"error": errors[0]} if errors else dict(first.extra)
        for rank, sender in enumerate(conv.senders):
            await sender.send(self._end_frame(conv, rank, first.first_token, extra))
        for sender in conv.senders:
            await sender.finish()
        self.active.pop(conv.request_id, None)
        metrics.CONVERSIONS.inc()
