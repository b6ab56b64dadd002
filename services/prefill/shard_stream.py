"""One prefill rank's KV stream for one request: begin, each layer's blocks as the layer is
done, end. Used by the leader rank (which adds the first token) and by follower ranks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from proto.frames import Frame
from proto.kv_descriptor import KVDescriptor
from proto.messages import KVRoute
from services.common.bus import Bus
from services.common.kv_stream import FrameSender
from services.common.settings import WorkerSettings
from services.engine.engine import NativeEngine
from services.kv.payload import payload_buffer

LAYERS_DONE = object()
Piece = tuple[int, int, bytes | memoryview]


class LayerFeed:
    """Hands each finished layer's blocks from the torch thread to the event loop."""

    def __init__(
        self, engine: NativeEngine, block_table: list[int], num_tokens: int, frame_limit: int
    ):
        self.engine = engine
        self.block_table = block_table
        self.num_tokens = num_tokens
        self.blocks_per_frame = max(1, (frame_limit - 1024) // engine.kv.payload_nbytes(1))
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def on_layer_done(self, layer: int) -> None:
        """In the torch thread: copy this layer's blocks out while the next layer runs."""
        kv, table = self.engine.kv, self.block_table
        pieces: list[Piece] = []
        for first in range(0, len(table), self.blocks_per_frame):
            chunk = table[first : first + self.blocks_per_frame]
            payload = payload_buffer(self.engine.cache.export_blocks(layer, chunk))
            stop = min(self.num_tokens, (first + len(chunk)) * kv.block_size)
            pieces.append((first * kv.block_size, stop, payload))
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (layer, pieces))
        if layer == kv.layers[-1]:
            self.done()

    def done(self) -> None:
        """No more layers (thread-safe; also called when the compute fails)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, LAYERS_DONE)


class Feed(Protocol):
    """Where a stream's layers come from: (layer, pieces) items, then LAYERS_DONE."""

    num_tokens: int
    queue: asyncio.Queue


async def stream_shard(
    bus: Bus,
    settings: WorkerSettings,
    kv: KVDescriptor,
    request_id: str,
    route: KVRoute,
    feed: Feed,
    finish: Callable[[], Awaitable[tuple[int | None, dict]]],
) -> FrameSender:
    """Send this rank's stream; `finish` gives the end frame's first token and extra once the
    layers are sent (the leader waits for its compute there). If anything fails, the end
    frame says so (the receiver frees its blocks at once) and the error propagates."""
    rank = 0 if route.via_converter else kv.tp_rank  # direct: rank r feeds decode rank r
    async with FrameSender(
        bus, route.send_to, settings.kv_window, settings.kv_ack_timeout_s, rank=rank
    ) as sender:
        frame: dict[str, Any] = {"request_id": request_id, "shard": kv.tp_rank, "layout_id": kv.id}
        seq_no = 0
        await sender.send(
            Frame(
                kind="begin",
                seq=seq_no,
                descriptor=kv,
                num_tokens=feed.num_tokens,
                dest_instance=route.decode_instance if route.via_converter else "",
                dest_descriptor=route.decode_kv,
                **frame,
            )
        )
        data_frames = 0
        try:
            while (item := await feed.queue.get()) is not LAYERS_DONE:
                layer, pieces = item
                for start, stop, payload in pieces:
                    seq_no += 1
                    data_frames += 1
                    await sender.send(
                        Frame(
                            kind="data",
                            seq=seq_no,
                            layer=layer,
                            token_start=start,
                            token_stop=stop,
                            payload=payload,
                            **frame,
                        )
                    )
            first_token, extra = await finish()
        except Exception as exc:
            await sender.send(
                Frame(
                    kind="end",
                    seq=seq_no + 1,
                    data_frames=data_frames,
                    extra={"error": f"prefill failed: {exc}"},
                    **frame,
                )
            )
            raise
        await sender.send(
            Frame(
                kind="end",
                seq=seq_no + 1,
                data_frames=data_frames,
                first_token=first_token,
                extra=extra,
                **frame,
            )
        )
        await sender.finish()
    return sender
