"""The KV-stream protocol, written once: every sender numbers and frames its stream with a
`StreamWriter`, every receiver checks what arrives with a `StreamReader`.

One request's KV moves from each sender shard as a stream (proto/frames.py):
    begin (seq 0: descriptor, prompt length [, where a converter forwards it])
    data  (seq 1..n: one layer, a whole number of blocks, tokens contiguous per layer)
    end   (seq n+1: how many data frames were sent, the first token, or the error)
A writer sends through a `FrameLink`: the transport (services/kv/nats_link.py today).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from proto.frames import Frame, FrameError
from proto.kv_descriptor import KVDescriptor


class FrameLink(Protocol):
    """A transport's sender of one stream: frames in order, acknowledged by the receiver."""

    bytes_sent: int
    frames_sent: int

    async def send(self, frame: Frame) -> None:
        """Send one frame; raises StreamFailed once the receiver has refused one."""
        ...

    async def finish(self) -> None:
        """Wait until every frame sent is acknowledged; raise if one was refused."""
        ...

    async def close(self) -> None: ...


class StreamWriter:
    """One shard's stream of one request, in descriptor `kv`: numbering, begin, data, end."""

    def __init__(self, link: FrameLink, request_id: str, kv: KVDescriptor):
        self.link = link
        self.request_id = request_id
        self.kv = kv
        self.next_seq = 0
        self.data_frames = 0
        self.ended = False

    def _frame(self, kind: str, **fields: Any) -> Frame:
        frame = Frame(
            kind=kind,
            request_id=self.request_id,
            seq=self.next_seq,
            shard=self.kv.tp_rank,
            layout_id=self.kv.id,
            **fields,
        )
        self.next_seq += 1
        return frame

    async def begin(
        self,
        num_tokens: int,
        dest_instance: str = "",
        dest_descriptor: KVDescriptor | None = None,
        token_offset: int = 0,
    ) -> None:
        """`token_offset`: the receiver holds tokens [0, offset) already (a cached prefix):
        data frames start there."""
        await self.link.send(
            self._frame(
                "begin",
                descriptor=self.kv,
                num_tokens=num_tokens,
                token_offset=token_offset,
                dest_instance=dest_instance,
                dest_descriptor=dest_descriptor,
            )
        )

    async def data(
        self,
        layer: int,
        token_start: int,
        token_stop: int,
        payload: bytes | memoryview,
        scales: tuple[float, float] | None = None,
    ) -> None:
        frame = self._frame(
            "data",
            layer=layer,
            token_start=token_start,
            token_stop=token_stop,
            payload=payload,
            scales=scales,
        )
        try:
            await self.link.send(frame)
        except Exception:
            self.next_seq -= 1  # never sent: the end frame telling the receiver follows on
            raise
        self.data_frames += 1

    async def end(self, first_token: int | None = None, extra: dict | None = None) -> None:
        """The stream is complete; wait until the receiver has acknowledged all of it."""
        self.ended = True
        frame = self._frame(
            "end", data_frames=self.data_frames, first_token=first_token, extra=extra or {}
        )
        await self.link.send(frame)
        await self.link.finish()

    async def fail(self, reason: str) -> None:
        """End the stream with an error, so the receiver lets go of what it holds at once.
        Best effort: the receiver may be why the stream failed."""
        if self.ended:
            return
        self.ended = True
        try:
            frame = self._frame(
                "end", data_frames=self.data_frames, extra={"error": reason or "sender failed"}
            )
            await self.link.send(frame)
        except Exception:  # noqa: BLE001 - nothing more to tell a receiver that is gone
            pass


@dataclass
class StreamReader:
    """Checks one incoming stream (one request, one sender shard) frame by frame.

    `expected`: the descriptor the receiver stores (None: whatever the begin frame
    announces, as a converter takes any). `num_tokens`: the prompt length the receiver
    expects (None: the begin's); `token_offset`: where it expects the stream to start (the
    tokens it already holds; None: the begin's). Receiver-specific checks (room in its blocks, payload sizes)
    stay with the receiver; this is the protocol's order, ids, continuity and completeness.
    """

    expected: KVDescriptor | None = None
    num_tokens: int | None = None
    token_offset: int | None = None
    next_seq: int = 0
    descriptor: KVDescriptor | None = None
    data_frames: int = 0
    layer_tokens: dict[int, int] = field(default_factory=dict)
    error: str | None = None  # the sender's, from an end frame
    complete: bool = False

    def take(self, frame: Frame) -> None:
        """Check `frame` against the stream so far; raise FrameError with the reason."""
        if frame.seq != self.next_seq:
            raise FrameError(f"sequence number {frame.seq}, expected {self.next_seq}")
        self.next_seq += 1
        mine = self.expected
        if mine is not None and frame.layout_id != mine.id:
            raise FrameError(
                f"layout {frame.layout_id} is not this instance's ({mine.id}, {mine.layout})"
            )
        if frame.kind == "begin":
            self._begin(frame)
        elif self.descriptor is None:
            raise FrameError(f"{frame.kind} frame before begin")
        elif frame.layout_id != self.descriptor.id:
            raise FrameError(f"layout {frame.layout_id} is not the begin's ({self.descriptor.id})")
        elif frame.kind == "data":
            self._data(frame)
        else:
            self._end(frame)

    def _begin(self, frame: Frame) -> None:
        assert frame.descriptor is not None  # decode_frame checked it
        if self.num_tokens is not None and frame.num_tokens != self.num_tokens:
            raise FrameError(
                f"begin announces {frame.num_tokens} tokens, the request has {self.num_tokens}"
            )
        if self.token_offset is not None and frame.token_offset != self.token_offset:
            raise FrameError(
                f"begin starts at token {frame.token_offset}, the receiver holds "
                f"{self.token_offset}"
            )
        if frame.token_offset % frame.descriptor.block_size:
            raise FrameError(f"begin starts at token {frame.token_offset}, inside a block")
        self.descriptor = frame.descriptor
        self.num_tokens = frame.num_tokens
        self.token_offset = frame.token_offset

    def _data(self, frame: Frame) -> None:
        assert self.descriptor is not None and self.num_tokens is not None
        if frame.layer not in self.descriptor.layers:
            raise FrameError(f"layer {frame.layer} outside {self.descriptor.layers}")
        have = self.layer_tokens.get(frame.layer, self.token_offset or 0)
        if frame.token_start != have or frame.token_stop > self.num_tokens:
            raise FrameError(
                f"layer {frame.layer}: tokens [{frame.token_start}, {frame.token_stop}) "
                f"do not continue [{self.token_offset or 0}, {have}) within {self.num_tokens}"
            )
        if frame.token_start % self.descriptor.block_size:
            raise FrameError(
                f"layer {frame.layer}: tokens start at {frame.token_start}, inside a block"
            )
        self.layer_tokens[frame.layer] = frame.token_stop
        self.data_frames += 1

    def _end(self, frame: Frame) -> None:
        assert self.descriptor is not None
        if "error" in frame.extra:
            self.error = str(frame.extra["error"])
            return
        if frame.data_frames != self.data_frames:
            raise FrameError(f"end says {frame.data_frames} data frames, {self.data_frames} came")
        missing = [
            layer
            for layer in self.descriptor.layers
            if self.layer_tokens.get(layer, 0) != self.num_tokens
        ]
        if missing:
            raise FrameError(f"end before layers {missing} were complete")
        self.complete = True

    def block_range(self, frame: Frame) -> tuple[int, int]:
        """The request's blocks a data frame fills: (first, count)."""
        assert self.descriptor is not None
        first = frame.token_start // self.descriptor.block_size
        return first, self.descriptor.blocks_for(frame.token_stop) - first
