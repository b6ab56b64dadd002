"""One decode rank's incoming KV streams: check every frame of a stream, store its blocks.

Used by the leader (rank 0, which also knows the request) and by follower ranks (which only
know the blocks the leader shared). Raises FrameError with the reason for anything wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opentelemetry.trace import Span

from proto.frames import Frame, FrameError
from proto.messages import GenerateRequest
from services.engine.engine import NativeEngine
from services.kv.payload import payload_view


@dataclass
class Inbound:
    """A request whose KV frames are arriving on this rank."""

    blocks: list[int]
    deadline: float
    request: GenerateRequest | None = None  # known on the leader
    next_seq: int = 0
    num_tokens: int = 0
    data_frames: int = 0
    layer_tokens: dict[int, int] = field(default_factory=dict)  # tokens received per layer
    span: Span | None = None


class KVReceiver:
    def __init__(self, engine: NativeEngine):
        self.engine = engine

    def take(self, inbound: Inbound, frame: Frame) -> bool:
        """Store one frame of the stream; True when it was the end of a complete stream."""
        kv = self.engine.kv
        if frame.seq != inbound.next_seq:
            raise FrameError(f"sequence number {frame.seq}, expected {inbound.next_seq}")
        inbound.next_seq += 1
        if frame.layout_id != kv.id:
            raise FrameError(
                f"layout {frame.layout_id} is not this instance's ({kv.id}, {kv.layout})"
            )
        if frame.kind == "begin":
            self._begin(inbound, frame)
            return False
        if frame.kind == "data":
            self._store(inbound, frame)
            return False
        return self._end(inbound, frame)

    def _begin(self, inbound: Inbound, frame: Frame) -> None:
        if inbound.request is not None:
            expected = len(inbound.request.context_token_ids)
            if frame.num_tokens != expected:
                raise FrameError(
                    f"begin announces {frame.num_tokens} tokens, request has {expected}"
                )
        if self.engine.blocks_for(frame.num_tokens) > len(inbound.blocks):
            raise FrameError(
                f"{frame.num_tokens} tokens do not fit the {len(inbound.blocks)} blocks reserved"
            )
        inbound.num_tokens = frame.num_tokens

    def _store(self, inbound: Inbound, frame: Frame) -> None:
        kv = self.engine.kv
        if inbound.num_tokens == 0:
            raise FrameError("data frame before begin")
        if frame.layer not in kv.layers:
            raise FrameError(f"layer {frame.layer} outside {kv.layers}")
        have = inbound.layer_tokens.get(frame.layer, 0)
        if frame.token_start != have or frame.token_stop > inbound.num_tokens:
            raise FrameError(
                f"layer {frame.layer}: tokens [{frame.token_start}, {frame.token_stop}) "
                f"do not continue [0, {have}) within {inbound.num_tokens}"
            )
        first = frame.token_start // kv.block_size
        count = self.engine.blocks_for(frame.token_stop) - first
        try:
            payload = payload_view(kv, frame.payload, count)
        except ValueError as exc:
            raise FrameError(str(exc)) from None
        self.engine.cache.import_blocks(frame.layer, inbound.blocks[first : first + count], payload)
        inbound.layer_tokens[frame.layer] = frame.token_stop
        inbound.data_frames += 1

    def _end(self, inbound: Inbound, frame: Frame) -> bool:
        if "error" in frame.extra:
            return False  # the sender failed; the caller releases the request
        if frame.data_frames != inbound.data_frames:
            raise FrameError(
                f"end says {frame.data_frames} data frames, {inbound.data_frames} came"
            )
        missing = [
            layer
            for layer in self.engine.kv.layers
            if inbound.layer_tokens.get(layer, 0) != inbound.num_tokens
        ]
        if missing:
            raise FrameError(f"end before layers {missing} were complete")
        return True
