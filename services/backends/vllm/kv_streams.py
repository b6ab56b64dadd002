"""One vLLM worker's outgoing KV streams, sent from the process the worker runs in: the
prefill service's own at tensor parallel 1, each of vLLM's worker processes above that. Its
own NATS connection on its own event-loop thread sends every request's stream of this rank
with the same `stream_shard` as the native prefill ranks: begin, each layer's blocks as the
connector saves them, end (rank 0's with the first token, once the service knows it).

Called from vLLM's thread (`open`, `put`, `layers_done`, `end`): everything is handed to the
loop thread, in order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from dataclasses import dataclass, field

from proto.kv_descriptor import KVDescriptor
from proto.messages import KVRoute
from services.common.bus import Bus
from services.common.settings import WorkerSettings
from services.kv.shard_stream import LAYERS_DONE, blocks_per_frame, receiver_rank, stream_shard

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    """A Feed for stream_shard, filled from another thread."""

    num_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    end: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    closed: bool = False  # LAYERS_DONE queued


@dataclass(frozen=True)
class StreamEnd:
    """What every vLLM worker needs to end its rank's stream of one request (picklable, for
    collective_rpc("hetserve_end_streams"))."""

    request_id: str
    route: dict  # KVRoute
    num_tokens: int
    first_token: int | None  # rank 0's end frame carries it
    extra: dict
    error: str  # "" unless the prefill failed


class KVStreams:
    def __init__(self, settings: WorkerSettings, kv: KVDescriptor):
        self.settings, self.kv = settings, kv
        self.loop = asyncio.new_event_loop()
        threading.Thread(
            target=self.loop.run_forever, name=f"hetserve-kv-rank{kv.tp_rank}", daemon=True
        ).start()
        connect = Bus.connect(settings, name=f"{settings.instance_id}-kv-rank{kv.tp_rank}")
        self.bus = asyncio.run_coroutine_threadsafe(connect, self.loop).result(timeout=60)
        self.blocks_per_frame = blocks_per_frame(kv, self.bus.frame_limit)
        self.streams: dict[str, _Stream] = {}

    def open(self, request_id: str, route: KVRoute, num_tokens: int) -> None:
        if request_id in self.streams:
            return
        stream = self.streams[request_id] = _Stream(num_tokens)
        asyncio.run_coroutine_threadsafe(self._send(request_id, route, stream), self.loop)

    def put(
        self, request_id: str, layer: int, start: int, stop: int, payload: bytes | memoryview
    ) -> None:
        stream = self.streams.get(request_id)
        if stream is None or stream.closed:  # the service gave up on it: vLLM may still save
            return
        self.loop.call_soon_threadsafe(stream.queue.put_nowait, (layer, [(start, stop, payload)]))

    def layers_done(self, request_id: str) -> None:
        stream = self.streams.get(request_id)
        if stream is not None and not stream.closed:
            stream.closed = True
            self.loop.call_soon_threadsafe(stream.queue.put_nowait, LAYERS_DONE)

    def end(self, end: StreamEnd) -> None:
        """The service's word on the request: its first token (rank 0 sends it), or why it
        failed; a stream that never began still tells the receiver, so it lets go at once."""
        route = KVRoute.model_validate(end.route)
        self.open(end.request_id, route, end.num_tokens)
        stream = self.streams[end.request_id]
        # vLLM saved the prompt's layers in the step that computed it, before its output
        # reached the service: a stream still open now would wait forever for them.
        error = end.error or ("" if stream.closed else "the prefill ended with layers unsaved")
        if error:
            self.layers_done(end.request_id)  # nothing more comes
            stream.end.set_exception(RuntimeError(error))
        else:
            token = end.first_token if self.kv.tp_rank == 0 else None
            stream.end.set_result((token, end.extra))

    async def _send(self, request_id: str, route: KVRoute, stream: _Stream) -> None:
        async def finish() -> tuple[int | None, dict]:
            return await asyncio.wrap_future(stream.end)

        try:
            async with self.bus.kv_link(route.send_to, receiver_rank(self.kv, route)) as link:
                await stream_shard(link, self.kv, request_id, route, stream, finish)
        except Exception:  # noqa: BLE001 - the receiver was told (end frame with the error)
            log.exception("rank %d: KV stream of %s failed", self.kv.tp_rank, request_id)
        finally:
            self.streams.pop(request_id, None)
