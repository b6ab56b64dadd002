"""`bench kv` part (c): how much KV transfer the real prefill worker leaves exposed.

A prompt goes through the real PrefillService (layer-wise: it publishes a layer's frames as
soon as the layer is computed) to the real DecodeService, direct or via the converter, with
blocks reserved first as the scheduler does. Observed from outside, on this process's clock:
    t_submit      the prefill job is sent
    t_compute     the prefill's first-token event arrives (it publishes it when compute ends)
    t_first_data  the first data frame reaches the first hop (a tap that unsubscribes itself
                  after the begin frame and that one data frame)
    t_complete    the last KV acknowledgement (the end frame's: decode has the whole KV; via
                  the converter, that ack follows decode's by one hop)
transfer = t_complete - t_first_data; exposed = t_complete - t_compute (not hidden behind
compute). `transfer_alone` moves the same frames with no compute (the synthetic sender), and
`colocated_prefill` runs the same engine prefill in this process, without streaming.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from nats.aio.msg import Msg

from proto.messages import (
    ErrorEvent,
    KVRoute,
    PrefillJob,
    TokenEvent,
    unpack_request_event,
)
from services.bench.kv_services import BenchTopology
from services.bench.kv_stream_gen import SyntheticKV, bench_request, new_request_id, reserve
from services.bench.kv_transfer import send_kv_request
from services.common.settings import WorkerSettings
from services.kv.nats_link import ack_payload

_ACK = ack_payload(True)


@dataclass
class ExposedSample:
    ttft_s: float
    transfer_s: float
    exposed_s: float


@dataclass
class ExposedRoute:
    route: str
    samples: list[ExposedSample] = field(default_factory=list)
    transfer_alone_s: list[float] = field(default_factory=list)

    def median(self, name: str) -> float:
        return statistics.median(getattr(s, name) for s in self.samples)

    def to_dict(self) -> dict[str, Any]:
        transfer, exposed = self.median("transfer_s"), self.median("exposed_s")
        alone = statistics.median(self.transfer_alone_s)
        return {
            "ttft_s": self.median("ttft_s"),
            "transfer_s": transfer,
            "exposed_s": exposed,
            "transfer_alone_s": alone,
            "exposed_over_transfer": exposed / transfer if transfer else 0.0,
            "exposed_over_transfer_alone": exposed / alone if alone else 0.0,
            "samples": [vars(s) for s in self.samples],
        }


@dataclass
class ExposedResult:
    num_tokens: int
    kv_bytes: int
    colocated_prefill_s: float
    routes: dict[str, ExposedRoute] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        routes = {}
        for name, route in self.routes.items():
            d = route.to_dict()
            # the literal measure: TTFT disaggregated minus TTFT colocated
            d["ttft_minus_colocated_s"] = d["ttft_s"] - self.colocated_prefill_s
            routes[name] = d
        return {
            "num_tokens": self.num_tokens,
            "kv_bytes": self.kv_bytes,
            "colocated_prefill_s": self.colocated_prefill_s,
            "routes": routes,
        }


class AckTap:
    """Times of every KV acknowledgement on the bus (they go to the senders' inboxes)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    async def on_msg(self, msg: Msg) -> None:
        if msg.data == _ACK:
            self.times.append(time.perf_counter())

    def last_since(self, start: float) -> float:
        later = [t for t in self.times if t >= start]
        if not later:
            raise RuntimeError("no KV acknowledgement seen on the bus")
        return later[-1]


async def _one_prompt(
    topo: BenchTopology, route: str, tap: AckTap, num_tokens: int, timeout_s: float
) -> ExposedSample:
    bus, ids = topo.bus, topo.ids
    decode = ids["direct"] if route == "direct" else ids["conv_decode"]
    first_hop = decode if route == "direct" else ids["converter"]
    rid = new_request_id(f"exp-{route}")
    request = bench_request(rid, num_tokens, max_tokens=2)
    events: asyncio.Queue = asyncio.Queue()
    frames: list[float] = []

    async def on_event(msg: Msg) -> None:
        events.put_nowait((time.perf_counter(), unpack_request_event(msg.data)))

    async def on_frame(msg: Msg) -> None:
        frames.append(time.perf_counter())

    subject = bus.subjects.request_events(rid)
    event_sub = await bus.nc.subscribe(subject, cb=on_event)
    # begin + the first data frame: UNSUB with a limit makes the server drop the tap after two
    frame_tap = await bus.nc.subscribe(bus.subjects.kv_frames(first_hop), cb=on_frame)
    await frame_tap.unsubscribe(limit=2)
    await bus.nc.flush()
    try:
        await reserve(bus, decode, request)
        job = PrefillJob(
            request=request,
            events_subject=subject,
            route=KVRoute(
                send_to=first_hop,
                decode_instance=decode,
                decode_kv=topo.kv("direct" if route == "direct" else "conv_decode"),
                via_converter=route == "converter",
            ),
        )
        t_submit = time.perf_counter()
        reply = await bus.nc.request(
            bus.subjects.prefill_jobs(ids["prefill"]), job.pack(), timeout=5
        )
        if reply.data != b"ok":
            raise RuntimeError(f"prefill refused the job: {reply.data[:200]!r}")
        t_compute = await _token_times(events, timeout_s)
        await asyncio.sleep(0.05)  # the converter's last ack trails decode's by one hop
    finally:
        await event_sub.unsubscribe()
    if len(frames) < 2:
        raise RuntimeError(f"the tap on {first_hop} saw {len(frames)} frame(s), not 2")
    t_complete = tap.last_since(t_submit)
    return ExposedSample(
        ttft_s=t_compute - t_submit,
        transfer_s=t_complete - frames[1],
        exposed_s=t_complete - t_compute,
    )


async def _token_times(events: asyncio.Queue, timeout_s: float) -> float:
    """When the prefill's first token arrived; returns once decode's token came too."""
    t_first = None
    deadline = time.monotonic() + timeout_s
    while True:
        t, event = await asyncio.wait_for(events.get(), max(0.1, deadline - time.monotonic()))
        if isinstance(event, ErrorEvent):
            raise RuntimeError(f"request failed at {event.instance_id}: {event.message}")
        if isinstance(event, TokenEvent):
            if event.index == 0:
                t_first = t
            elif t_first is not None:
                return t_first


class ColocatedPrefill:
    """The same prefill (model, layout, one torch thread) in this process, no streaming."""

    def __init__(self, topo: BenchTopology, num_tokens: int):
        from services.backends.native.build import build_engine

        c, kv = topo.config, topo.kv("prefill")
        self.num_tokens = num_tokens
        self.engine, _world = build_engine(
            WorkerSettings(
                model=str(c.model_dir),
                kv_layout=kv.layout,
                block_size=kv.block_size,
                kv_dtype=kv.dtype,
                num_blocks=-(-num_tokens // kv.block_size) + 4,  # + reserved
                device="cpu",
                torch_threads=1,
                nats_url=c.nats_url,
            )
        )

    def time_once(self) -> float:
        engine = self.engine
        seq = engine.new_sequence(bench_request(new_request_id("colo"), self.num_tokens, 2))
        seq.block_table = engine.blocks.allocate(engine.blocks_for(self.num_tokens))
        try:
            start = time.perf_counter()
            engine.prefill(seq)
            return time.perf_counter() - start
        finally:
            engine.blocks.free(seq.block_table)


async def measure_exposed(
    topo: BenchTopology, num_tokens: int = 1024, repeats: int = 5, timeout_s: float = 120.0
) -> ExposedResult:
    """Colocated prefill, direct and converter routes take turns, after one warm-up each."""
    threads = torch.get_num_threads()
    kv = SyntheticKV.build(topo.kv("prefill"), num_tokens, topo.config.max_frame_bytes)
    tap = AckTap()
    tap_sub = await topo.bus.nc.subscribe("_INBOX.>", cb=tap.on_msg)
    try:
        colocated = await asyncio.to_thread(ColocatedPrefill, topo, num_tokens)
        routes = {r: ExposedRoute(r) for r in ("direct", "converter")}
        colocated_s = []
        for turn in range(repeats + 1):
            took = await asyncio.to_thread(colocated.time_once)
            samples = [await _one_prompt(topo, r, tap, num_tokens, timeout_s) for r in routes]
            alone = [await send_kv_request(topo, r, kv) for r in routes]
            if turn == 0:
                continue  # warm-up
            colocated_s.append(took)
            for stats, sample, seconds in zip(routes.values(), samples, alone, strict=True):
                stats.samples.append(sample)
                stats.transfer_alone_s.append(seconds)
    finally:
        await tap_sub.unsubscribe()
        torch.set_num_threads(threads)
    return ExposedResult(num_tokens, kv.payload_bytes, statistics.median(colocated_s), routes)
