"""convert_layer: a target shard's pieces of one layer, straight from the source pieces."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from proto.kv_descriptor import KVDescriptor
from services.kv.dtypes import torch_dtype
from services.kv.payload import readonly_bytes
from services.kv.relayout.casting import casters
from services.kv.relayout.pieces import (
    UNIT_SCALES,
    KVScales,
    OutPiece,
    ShardLayer,
    assign_heads,
    check_convertible,
    sorted_pieces,
)
from services.kv.relayout.plan import plan_layer


def convert_layer(
    sources: Sequence[ShardLayer],
    target: KVDescriptor,
    num_tokens: int,
    max_payload_bytes: int,
    *,
    scales: KVScales = UNIT_SCALES,
    layer: int | None = None,
    first: int = 0,
) -> list[OutPiece]:
    """Target shard's pieces of one layer's tokens [first, num_tokens), from the pieces of
    the source shards holding its heads (extra shards and replicas are ignored). `scales` are
    the target's fp8 scales; `layer`, when given, must lie in every descriptor's layer range;
    `first` (the tokens the receiver already holds) must start a block on every side."""
    for src in sources:
        check_convertible(src.desc, target)
    if layer is not None:
        for desc in (target, *(s.desc for s in sources)):
            if layer not in desc.layers:
                raise ValueError(f"layer {layer} is outside {desc.layout} layers {desc.layers}")
    used = []
    for i, taken in assign_heads([s.desc for s in sources], target.heads):
        pieces = sorted_pieces(sources[i].desc, sources[i].pieces, num_tokens, first)
        used.append((sources[i], taken, pieces))
    plan = plan_layer(
        tuple((s.desc, taken, tuple((a, b) for a, b, _ in pieces)) for s, taken, pieces in used),
        target,
        num_tokens,
        max_payload_bytes,
        first,
    )
    flats = [[readonly_bytes(data) for _, _, data in pieces] for _, _, pieces in used]
    casts = [
        casters(torch_dtype(s.desc), s.scales, torch_dtype(target), scales) for s, _, _ in used
    ]
    out = []
    for chunk in plan:
        buffer = torch.empty(chunk.nbytes, dtype=torch.uint8)
        for zeros in chunk.zeros:
            zeros.of(buffer).zero_()
        for move in chunk.moves:
            move.run(buffer, flats[move.shard][move.piece], casts[move.shard][move.plane])
        out.append((chunk.start, chunk.stop, memoryview(buffer.numpy())))
    return out
