"""The KV frame codec: round trips, and every malformed frame rejected with its reason."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.frames import Frame, FrameError, decode_frame, encode_frame
from proto.kv_descriptor import KVDescriptor

LIMIT = 1 << 20
DESC = KVDescriptor(
    layout="vllm-flash", block_size=16, dtype="float32", num_layers=2, num_kv_heads=2, head_dim=32
)


def data_frame(**overrides: object) -> Frame:
    fields = dict(
        kind="data",
        request_id="r1",
        seq=1,
        shard=0,
        layout_id=DESC.id,
        layer=1,
        token_start=16,
        token_stop=20,
        payload=b"\x01\x02" * 100,
    )
    fields.update(overrides)
    return Frame(**fields)


def test_round_trip_of_each_kind() -> None:
    begin = Frame(
        kind="begin",
        request_id="r1",
        seq=0,
        shard=0,
        layout_id=DESC.id,
        descriptor=DESC,
        num_tokens=20,
        dest_instance="d-0",
        dest_descriptor=DESC,
    )
    got = decode_frame(encode_frame(begin), LIMIT)
    assert (got.descriptor, got.num_tokens, got.dest_instance, got.dest_descriptor) == (
        DESC,
        20,
        "d-0",
        DESC,
    )
    data = decode_frame(encode_frame(data_frame()), LIMIT)
    assert (data.layer, data.token_start, data.token_stop, bytes(data.payload)) == (
        1,
        16,
        20,
        b"\x01\x02" * 100,
    )
    end = Frame(
        kind="end",
        request_id="r1",
        seq=2,
        shard=0,
        layout_id=DESC.id,
        data_frames=1,
        first_token=42,
        extra={"finished": False},
    )
    got = decode_frame(encode_frame(end), LIMIT)
    assert (got.data_frames, got.first_token, got.extra) == (1, 42, {"finished": False})


def _tamper(frame: Frame, **header: object) -> bytes:
    head, payload = msgpack.unpackb(encode_frame(frame), raw=False)
    head.update(header)
    return msgpack.packb([head, payload], use_bin_type=True)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (encode_frame(data_frame())[:-10], "not a msgpack frame"),
        (_tamper(data_frame(), xxh=1), "checksum mismatch"),
        (_tamper(data_frame(), n=5), "truncated payload"),
        (_tamper(data_frame(), v=99), "unsupported frame version"),
        (_tamper(data_frame(), kind="blob"), "unknown frame kind"),
        (_tamper(data_frame(), tok=[20, 16]), "bad token range"),
        (_tamper(data_frame(), seq="one"), "'seq' has type str"),
        (_tamper(data_frame(), layer=-1), "negative layer"),
        (msgpack.packb({"v": 1}), "not a [header, payload] pair"),
        (
            _tamper(
                Frame(
                    kind="begin",
                    request_id="r",
                    seq=0,
                    shard=0,
                    layout_id=DESC.id,
                    descriptor=DESC,
                    num_tokens=3,
                ),
                desc={**DESC.model_dump(), "layout": "x"},
            ),
            "unknown KV layout",
        ),
        (
            _tamper(
                Frame(
                    kind="begin",
                    request_id="r",
                    seq=0,
                    shard=0,
                    layout_id="0" * 12,
                    descriptor=DESC,
                    num_tokens=3,
                )
            ),
            "layout id does not match",
        ),
    ],
)
def test_malformed_frames_are_rejected_with_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        decode_frame(raw, LIMIT)


def test_oversized_frame_is_rejected_before_parsing() -> None:
    with pytest.raises(FrameError, match="exceeds the limit"):
        decode_frame(encode_frame(data_frame(payload=b"x" * 5000)), 4096)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_decoder_never_crashes_on_garbage(raw: bytes) -> None:
    try:
        decode_frame(raw, LIMIT)
    except FrameError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "v",
                "kind",
                "rid",
                "seq",
                "shard",
                "layout",
                "layer",
                "tok",
                "n",
                "xxh",
                "desc",
                "ntok",
                "frames",
                "first",
                "extra",
                "dest",
                "dest_desc",
            ]
        ),
        st.one_of(
            st.integers(-5, 5),
            st.text(max_size=5),
            st.binary(max_size=4),
            st.lists(st.integers(-3, 3), max_size=3),
            st.none(),
            st.dictionaries(st.text(max_size=3), st.integers(-9, 9), max_size=2),
        ),
    ),
    st.binary(max_size=64),
)
def test_decoder_rejects_any_header_it_cannot_trust(header: dict, payload: bytes) -> None:
    raw = msgpack.packb([header, payload], use_bin_type=True)
    try:
        frame = decode_frame(raw, LIMIT)
    except FrameError:
        return
    # Whatever got through is internally consistent.
    assert frame.kind in ("begin", "data", "end") and frame.seq >= 0 and frame.shard >= 0
    if frame.kind == "data":
        assert 0 <= frame.token_start < frame.token_stop and len(frame.payload) == header["n"]
