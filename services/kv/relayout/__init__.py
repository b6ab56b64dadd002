"""Re-lay one layer's KV from any descriptor to any other: pure tensor functions, no I/O.

The canonical form is tokens (T, H, D) in head order; every layout is reached from it through
services/kv/views.py, so nothing here knows a vendor. Two paths give the same bytes:
- reference.py: tokens_from_pieces -> merge_shards -> pieces_for, simple, materialising the
  layer's tokens;
- convert.py: convert_layer, copying the source pieces straight into the target payloads by
  a plan (plan.py) worked out once per (descriptors, piece ranges, token count, payload limit)
  and cached: a few strided copies per plane and piece (moves.py), widened, merged or
  transposed by SIMD where the layouts allow (plus a float32 temporary for fp8 casts).
Both read frame bytes without copying them and return payloads as memoryviews over fresh
buffers. Loops run over pieces, shards and heads, never tokens or blocks.
"""

from services.kv.relayout.casting import cast_kv
from services.kv.relayout.convert import convert_layer
from services.kv.relayout.pieces import (
    UNIT_SCALES,
    KVScales,
    OutPiece,
    Piece,
    ShardLayer,
    assign_heads,
    check_convertible,
)
from services.kv.relayout.reference import merge_shards, pieces_for, tokens_from_pieces

__all__ = [
    "UNIT_SCALES",
    "KVScales",
    "OutPiece",
    "Piece",
    "ShardLayer",
    "assign_heads",
    "cast_kv",
    "check_convertible",
    "convert_layer",
    "merge_shards",
    "pieces_for",
    "tokens_from_pieces",
]
