"""One sender shard's KV stream for one request: begin, each layer's new blocks as soon as
the layer is computed, end. Used by every prefill rank, native or vLLM, and by the benchmarks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

import torch

from proto.kv_descriptor import KVDescriptor
from proto.messages import KVRoute
from services.kv.payload import payload_buffer
from services.kv.stream import FrameLink, StreamWriter

LAYERS_DONE = object()
Piece = tuple[int, int, bytes | memoryview]
ExportBlocks = Callable[[int, list[int]], dict[str, torch.Tensor]]  # (layer, blocks) -> payload
FRAME_HEADER_ROOM = 1024  # bytes of a data frame that are not payload


def receiver_rank(kv: KVDescriptor, route: KVRoute) -> int:
    """Which rank of the first hop takes this shard's stream: a converter takes every shard's
    on rank 0 (it re-shards); a decode instance with the same descriptor pairs rank to rank."""
    return 0 if route.via_converter else kv.tp_rank


def blocks_per_frame(kv: KVDescriptor, frame_limit: int) -> int:
    return max(1, (frame_limit - FRAME_HEADER_ROOM) // kv.payload_nbytes(1))


class Feed(Protocol):
    """Where a stream's layers come from: (layer, pieces) items, then LAYERS_DONE (or an
    exception: the stream fails with it)."""

    num_tokens: int
    queue: asyncio.Queue


class LayerFeed:
    """Hands a request's computed layers from the torch thread to the event loop.

    The prompt may be computed in chunks (chunked prefill, a prefix already cached): after
    each layer of a step that computed tokens up to `stop`, the layer's new whole blocks go
    out; a block the chunk left incomplete goes with the next chunk, so every frame starts on
    a block boundary and each layer's tokens arrive in order. Tokens the receiver already
    holds (a cached prefix) are not sent.
    """

    def __init__(
        self,
        kv: KVDescriptor,
        export: ExportBlocks,
        block_table: list[int],
        num_tokens: int,
        frame_limit: int,
        loop: asyncio.AbstractEventLoop | None = None,
        token_offset: int = 0,
    ):
        """`token_offset`: the receiver holds tokens [0, offset) already; they are not sent."""
        self.kv = kv
        self.export = export
        self.block_table = block_table
        self.num_tokens = num_tokens
        self.blocks_per_frame = blocks_per_frame(kv, frame_limit)
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sent = token_offset  # tokens every layer has sent (or the receiver has)

    def on_layer_done(self, layer: int, stop: int | None = None) -> None:
        """In the torch thread: copy this layer's new blocks out while the next layer runs."""
        stop = self.num_tokens if stop is None else stop
        bs = self.kv.block_size
        upto = max(stop if stop >= self.num_tokens else stop // bs * bs, self.sent)
        pieces: list[Piece] = []
        first_block, end_block = self.sent // bs, self.kv.blocks_for(upto)
        for first in range(first_block, end_block, self.blocks_per_frame):
            chunk = self.block_table[first : min(first + self.blocks_per_frame, end_block)]
            payload = payload_buffer(self.export(layer, chunk))
            piece_stop = min(upto, (first + len(chunk)) * bs)
            pieces.append((first * bs, piece_stop, payload))
        if pieces:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (layer, pieces))
        if layer == self.kv.layers[-1]:
            self.sent = upto
            if upto >= self.num_tokens:
                self.done()

    def done(self) -> None:
        """No more layers (thread-safe)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, LAYERS_DONE)

    def fail(self, reason: str) -> None:
        """No more layers: the compute failed or was abandoned (thread-safe)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, RuntimeError(reason))


Finish = Callable[[], Awaitable[tuple[int | None, dict]]]


async def stream_shard(
    link: FrameLink,
    kv: KVDescriptor,
    request_id: str,
    route: KVRoute,
    feed: Feed,
    finish: Finish,
) -> StreamWriter:
    """Send this shard's stream through `link`; `finish` gives the end frame's first token and
    extra once the layers are sent (the leader waits for its compute there). If anything
    fails, the end frame says so (the receiver frees its blocks at once) and the error
    propagates."""
    writer = StreamWriter(link, request_id, kv)
    await writer.begin(
        feed.num_tokens,
        dest_instance=route.decode_instance if route.via_converter else "",
        dest_descriptor=route.decode_kv,
        token_offset=route.token_offset,
    )
    try:
        while (item := await feed.queue.get()) is not LAYERS_DONE:
            if isinstance(item, Exception):
                raise item
            layer, pieces = item
            for start, stop, payload in pieces:
                await writer.data(layer, start, stop, payload)
        first_token, extra = await finish()
    except Exception as exc:
        await writer.fail(f"prefill failed: {exc}")
        raise
    await writer.end(first_token, extra)
    return writer
