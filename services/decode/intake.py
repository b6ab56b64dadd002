"""One decode rank's incoming KV streams: every frame checked by the stream protocol, its
blocks imported into the rank's cache (in a worker thread: the copy is torch work)."""

from __future__ import annotations

import asyncio

from proto.frames import Frame, FrameError
from proto.kv_descriptor import KVDescriptor
from services.engine.kv_cache import PagedKVCache
from services.kv.payload import payload_view
from services.kv.stream import StreamReader


class RankIntake:
    def __init__(self, kv: KVDescriptor, cache: PagedKVCache):
        self.kv = kv
        self.cache = cache
        self.readers: dict[str, StreamReader] = {}

    def open(
        self, request_id: str, num_tokens: int | None, token_offset: int | None = 0
    ) -> StreamReader:
        """Expect a stream of `num_tokens` prompt tokens (None: the begin's) for a request,
        starting at `token_offset` (the tokens its blocks hold already; None: the begin's)."""
        reader = StreamReader(expected=self.kv, num_tokens=num_tokens, token_offset=token_offset)
        self.readers[request_id] = reader
        return reader

    def close(self, request_id: str) -> None:
        self.readers.pop(request_id, None)

    async def take(self, frame: Frame, blocks: list[int]) -> StreamReader:
        """Check `frame` and store its blocks (the request's are `blocks`); FrameError if
        anything is wrong. The reader says whether the stream is complete or failed."""
        reader = self.readers.get(frame.request_id)
        if reader is None:
            raise FrameError(f"frame for unknown request {frame.request_id!r}")
        reader.take(frame)
        if frame.kind == "begin" and self.kv.blocks_for(frame.num_tokens) > len(blocks):
            raise FrameError(
                f"{frame.num_tokens} tokens do not fit the {len(blocks)} blocks reserved"
            )
        if frame.kind == "data":
            first, count = reader.block_range(frame)
            try:
                payload = payload_view(self.kv, frame.payload, count)
            except ValueError as exc:
                raise FrameError(str(exc)) from None
            await asyncio.to_thread(
                self.cache.import_blocks, frame.layer, blocks[first : first + count], payload
            )
        return reader
