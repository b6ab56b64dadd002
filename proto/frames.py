"""The KV frame codec: msgpack `[header, payload]` with a versioned header and an xxh3-64
checksum of the payload.

One request's KV moves from each prefill shard as a stream:
    begin (seq 0: source descriptor, prompt length, the tokens the receiver already holds)
    data  (seq 1..n: one layer, a whole number of blocks, raw bytes in the source layout)
    end   (seq n+1: how many data frames were sent, the first sampled token)
The decoder trusts nothing it has not checked: types, ranges, lengths, checksum.

A data frame's payload may instead lie in memory the receiver registered with a transfer
engine (services/kv/mooncake_link.py): its header then says where (`at`, a slot the receiver
leased to the stream), still with the payload's length and checksum, and carries no bytes;
the decoder checks the staged bytes exactly as it checks inline ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import xxhash

from proto.kv_descriptor import KVDescriptor

FRAME_VERSION = 2  # 2: xxh3-64 checksum (1 used CRC32, 10x slower)
FrameKind = Literal["begin", "data", "end"]
_KINDS = ("begin", "data", "end")


class FrameError(ValueError):
    """A frame that must be rejected; the message says why. `request_id` is set when the
    header could be read far enough to know whose frame it was."""

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


@dataclass
class Frame:
    kind: FrameKind
    request_id: str
    seq: int
    shard: int
    layout_id: str
    # data frames
    layer: int = -1
    token_start: int = 0
    token_stop: int = 0
    payload: bytes | memoryview = b""
    scales: tuple[float, float] | None = None  # fp8 per-tensor K and V scales of this layer
    # begin frames
    descriptor: KVDescriptor | None = None
    num_tokens: int = 0
    token_offset: int = 0  # the receiver holds tokens [0, offset) already: the stream starts there
    dest_instance: str = ""  # where a converter forwards the stream ("" when sent direct)
    dest_descriptor: KVDescriptor | None = None  # the layout the final receiver stores
    # end frames
    data_frames: int = 0
    first_token: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# (request id, shard, slot, length) -> the staged payload's bytes; FrameError if that slot is
# not the stream's or the length does not fit it
StagedPayload = Callable[[str, int, int, int], memoryview]


def encode_frame(frame: Frame, at: int | None = None) -> bytes:
    """`at`: the payload was written into the receiver's staging slot `at`; the frame carries
    its length and checksum, not its bytes."""
    header: dict[str, Any] = {
        "v": FRAME_VERSION,
        "kind": frame.kind,
        "rid": frame.request_id,
        "seq": frame.seq,
        "shard": frame.shard,
        "layout": frame.layout_id,
    }
    payload = frame.payload
    if frame.kind == "data":
        header.update(
            layer=frame.layer,
            tok=[frame.token_start, frame.token_stop],
            n=len(payload),
            xxh=xxhash.xxh3_64_intdigest(payload),
        )
        if at is not None:
            header["at"] = at
            payload = b""
        if frame.scales is not None:
            header["scale"] = [float(frame.scales[0]), float(frame.scales[1])]
    elif frame.kind == "begin":
        if frame.descriptor is None:
            raise FrameError("begin frame needs a descriptor")
        header.update(
            desc=frame.descriptor.model_dump(),
            ntok=frame.num_tokens,
            dest=frame.dest_instance,
            dest_desc=frame.dest_descriptor.model_dump() if frame.dest_descriptor else None,
        )
        if frame.token_offset:
            header["from"] = frame.token_offset
        payload = b""
    else:
        header.update(frames=frame.data_frames, first=frame.first_token, extra=frame.extra)
        payload = b""
    return msgpack.packb([header, payload], use_bin_type=True)


def _field(header: dict, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in header:
        raise FrameError(f"{what}: header lacks {key!r}")
    value = header[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise FrameError(f"{what}: header field {key!r} has type {type(value).__name__}")
    return value


def decode_frame(data: bytes, max_bytes: int, staged: StagedPayload | None = None) -> Frame:
    """`staged`: where a frame whose payload is in registered memory finds it (None: this
    receiver has none, and such a frame is rejected)."""
    if len(data) > max_bytes:
        raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        outer = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            max_bin_len=max_bytes,
            max_str_len=1 << 16,
            max_array_len=1 << 16,
            max_map_len=256,
        )
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise FrameError(f"not a msgpack frame: {type(exc).__name__}: {exc}") from exc
    if not isinstance(outer, list) or len(outer) != 2:
        raise FrameError("frame is not a [header, payload] pair")
    header, payload = outer
    if not isinstance(header, dict) or not isinstance(payload, bytes):
        raise FrameError("frame is not a [header map, payload bytes] pair")
    rid = header.get("rid")
    try:
        return _decode_checked(header, payload, staged)
    except FrameError as exc:
        exc.request_id = rid if isinstance(rid, str) else None
        raise


def _staged(
    header: dict, inline: bytes, size: int, frame: Frame, staged: StagedPayload | None
) -> memoryview:
    slot = _field(header, "at", int, "data")
    if staged is None:
        raise FrameError("data: payload staged in transfer-engine memory, this receiver has none")
    if inline:
        raise FrameError("data: a staged frame carries bytes too")
    if slot < 0 or size < 0:
        raise FrameError(f"data: bad staging slot {slot} or length {size}")
    return staged(frame.request_id, frame.shard, slot, size)


def _decode_checked(header: dict, payload: bytes, staged: StagedPayload | None = None) -> Frame:
    version = header.get("v")
    if version != FRAME_VERSION:
        raise FrameError(
            f"unsupported frame version {version!r} (this build speaks {FRAME_VERSION})"
        )
    kind = _field(header, "kind", str, "frame")
    if kind not in _KINDS:
        raise FrameError(f"unknown frame kind {kind!r}")
    frame = Frame(
        kind=kind,
        request_id=_field(header, "rid", str, kind),
        seq=_field(header, "seq", int, kind),
        shard=_field(header, "shard", int, kind),
        layout_id=_field(header, "layout", str, kind),
    )
    if frame.seq < 0 or frame.shard < 0:
        raise FrameError(f"{kind}: negative seq or shard")
    if kind == "data":
        frame.layer = _field(header, "layer", int, kind)
        tok = _field(header, "tok", list, kind)
        if len(tok) != 2 or not all(isinstance(t, int) for t in tok) or not 0 <= tok[0] < tok[1]:
            raise FrameError(f"data: bad token range {tok!r}")
        frame.token_start, frame.token_stop = tok
        size = _field(header, "n", int, kind)
        if "at" in header:
            payload = _staged(header, payload, size, frame, staged)
        if size != len(payload):
            raise FrameError(f"data: truncated payload ({len(payload)} bytes, header says {size})")
        digest = _field(header, "xxh", int, kind)
        if xxhash.xxh3_64_intdigest(payload) != digest:
            raise FrameError("data: checksum mismatch")
        if frame.layer < 0:
            raise FrameError(f"data: negative layer {frame.layer}")
        scale = header.get("scale")
        if scale is not None:
            if (
                not isinstance(scale, list)
                or len(scale) != 2
                or not all(isinstance(x, float) and x > 0 for x in scale)
            ):
                raise FrameError(f"data: bad fp8 scales {scale!r}")
            frame.scales = (scale[0], scale[1])
        frame.payload = payload
    elif kind == "begin":
        try:
            frame.descriptor = KVDescriptor.model_validate(_field(header, "desc", dict, kind))
        except ValueError as exc:
            raise FrameError(f"begin: bad descriptor: {exc}") from exc
        if frame.descriptor.id != frame.layout_id:
            raise FrameError("begin: layout id does not match its descriptor")
        frame.num_tokens = _field(header, "ntok", int, kind)
        frame.dest_instance = _field(header, "dest", str, kind)
        dest_desc = header.get("dest_desc")
        if dest_desc is not None:
            if not isinstance(dest_desc, dict):
                raise FrameError("begin: destination descriptor is not a map")
            try:
                frame.dest_descriptor = KVDescriptor.model_validate(dest_desc)
            except ValueError as exc:
                raise FrameError(f"begin: bad destination descriptor: {exc}") from exc
        if frame.num_tokens < 1:
            raise FrameError("begin: a prompt has at least one token")
        offset = header.get("from", 0)
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise FrameError(f"begin: token offset {offset!r} is not an integer")
        if not 0 <= offset < frame.num_tokens:
            raise FrameError(f"begin: token offset {offset} outside [0, {frame.num_tokens})")
        frame.token_offset = offset
    else:
        frame.data_frames = _field(header, "frames", int, kind)
        first = header.get("first")
        if first is not None and not isinstance(first, int):
            raise FrameError("end: first token is not an integer")
        frame.first_token = first
        extra = header.get("extra", {})
        if not isinstance(extra, dict):
            raise FrameError("end: extra is not a map")
        frame.extra = extra
    return frame
