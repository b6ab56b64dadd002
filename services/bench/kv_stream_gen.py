"""A synthetic prefill side for `bench kv`: one request's KV frames, sent as prefill sends them.

The frames are those services/prefill/worker.py publishes for a prompt of `num_tokens`:
begin (source descriptor, destination when a converter forwards), one layer at a time in
pieces of whole blocks one block short of the frame limit, end (the first token). They go
through the link the bus's transport gives (nats, or mooncake: credit window, reply inbox),
so the only thing that differs between the ceiling, direct and converter measurements is who
receives them.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from proto.frames import Frame
from proto.kv_descriptor import KVDescriptor
from proto.messages import GenerateRequest, ReserveReply, ReserveRequest, SamplingParams
from services.bench.kv_convert import frame_payload_limit
from services.common.bus import Bus
from services.kv.relayout import pieces_for


class ReserveRefused(RuntimeError):
    """The decode instance would not hold blocks for a request."""


def new_request_id(tag: str) -> str:
    return f"kvbench-{tag}-{uuid.uuid4().hex[:10]}"


def bench_request(request_id: str, num_tokens: int, max_tokens: int) -> GenerateRequest:
    """A greedy request of `num_tokens` prompt ids that never stops early (EOS ignored). The
    ids are drawn from the request id: a decode's prefix cache never holds an earlier
    request's blocks of it, so every request moves its whole KV."""
    rng = random.Random(request_id)
    ids = [rng.randrange(10, 910) for _ in range(num_tokens)]
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerateRequest(
        request_id=request_id, prompt_token_ids=ids, sampling=sampling, submitted_at=time.time()
    )


async def reserve(
    bus: Bus,
    decode_instance: str,
    request: GenerateRequest,
    hold_s: float = 30.0,
    timeout_s: float = 5.0,
) -> None:
    """Hold blocks at the decode instance exactly as the scheduler does before prefill."""
    remaining = request.sampling.max_tokens - len(request.resumed_token_ids)
    ask = ReserveRequest(
        request=request,
        num_tokens=len(request.context_token_ids) + max(remaining, 1),
        hold_seconds=hold_s,
    )
    reply = await bus.request(
        bus.subjects.reserve(decode_instance), ask, ReserveReply, timeout_s=timeout_s
    )
    if not reply.ok:
        raise ReserveRefused(f"{decode_instance} refused {request.request_id}: {reply.reason}")


@dataclass(frozen=True)
class SyntheticKV:
    """One request's KV in `desc`'s layout; every layer carries the same random bytes."""

    desc: KVDescriptor
    num_tokens: int
    pieces: tuple[tuple[int, int, bytes], ...]  # one layer's (token_start, token_stop, payload)

    @classmethod
    def build(
        cls, desc: KVDescriptor, num_tokens: int, max_frame_bytes: int, seed: int = 0
    ) -> SyntheticKV:
        gen = torch.Generator().manual_seed(seed)
        shape = (num_tokens, desc.num_kv_heads, desc.head_dim)
        k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        limit = frame_payload_limit(desc, max_frame_bytes)
        pieces = tuple((a, b, bytes(p)) for a, b, p in pieces_for(desc, k, v, limit))
        return cls(desc, num_tokens, pieces)

    @property
    def payload_bytes(self) -> int:
        """KV bytes of the whole request (what goodput counts)."""
        return len(self.desc.layers) * sum(len(p) for _, _, p in self.pieces)

    @property
    def data_frames(self) -> int:
        return len(self.desc.layers) * len(self.pieces)

    def frames(
        self,
        request_id: str,
        dest_instance: str = "",
        dest_desc: KVDescriptor | None = None,
        first_token: int = 11,
    ) -> Iterator[Frame]:
        desc = self.desc
        common = {"request_id": request_id, "shard": desc.tp_rank, "layout_id": desc.id}
        yield Frame(
            kind="begin",
            seq=0,
            descriptor=desc,
            num_tokens=self.num_tokens,
            dest_instance=dest_instance,
            dest_descriptor=dest_desc or desc,
            **common,
        )
        seq = 0
        for layer in desc.layers:
            for start, stop, payload in self.pieces:
                seq += 1
                yield Frame(
                    kind="data",
                    seq=seq,
                    layer=layer,
                    token_start=start,
                    token_stop=stop,
                    payload=payload,
                    **common,
                )
        yield Frame(
            kind="end",
            seq=seq + 1,
            data_frames=seq,
            first_token=first_token,
            extra={"finished": False},
            **common,
        )


async def send_stream(bus: Bus, receiver: str, frames: Iterator[Frame]) -> float:
    """Seconds from the first frame sent to the last one acknowledged (the bus's window,
    acknowledgement timeout and transport)."""
    async with bus.kv_link(receiver) as sender:
        start = time.perf_counter()
        for frame in frames:
            await sender.send(frame)
        await sender.finish()
        return time.perf_counter() - start
