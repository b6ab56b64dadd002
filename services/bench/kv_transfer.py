"""`bench kv` part (b): KV goodput prefill -> decode, direct and via the converter, against
the raw NATS ceiling, all measured in the same run with the same frames and window, on one
KV transport (the services' and this process's).

Routes, all fed by the synthetic prefill side (kv_stream_gen) from this process:
    ceiling    frames -> echo (acknowledges, nothing else): core NATS request/reply
    engine     (mooncake) the same payloads, one write per frame, one at a time, written by
               this process's transfer engine into another's registered memory: no NATS, no
               receiver work, no copy into a send area (the Mooncake ceiling)
    direct     frames -> the real DecodeService, which checks and stores them in its cache
    converter  frames -> the real ConverterService -> the real DecodeService (two bus legs)
Blocks are reserved at decode before each request (untimed, as the scheduler does). The
routes take turns request by request, so a change in the machine's load falls on all three;
besides the ratio of total goodputs, the median of the per-turn ratios is reported.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from proto.kv_descriptor import KVDescriptor
from services.bench.kv_convert import frame_payload_limit
from services.bench.kv_services import BenchTopology
from services.bench.kv_stream_gen import (
    SyntheticKV,
    bench_request,
    new_request_id,
    reserve,
    send_stream,
)

ROUTES = ("ceiling", "direct", "converter")
ENGINE_ROUTE = "engine"  # the Mooncake ceiling, on the mooncake transport


def routes_for(transport: str) -> tuple[str, ...]:
    return ("ceiling", ENGINE_ROUTE, "direct", "converter") if transport == "mooncake" else ROUTES


@dataclass
class RouteGoodput:
    route: str
    request_bytes: int
    times: list[float] = field(default_factory=list)  # seconds per request, turn by turn

    @property
    def payload_bytes(self) -> int:
        return self.request_bytes * len(self.times)

    @property
    def seconds(self) -> float:
        return sum(self.times)

    @property
    def gbps(self) -> float:
        return self.payload_bytes / self.seconds / 1e9 if self.times else 0.0


@dataclass
class TransferResult:
    transport: str
    num_tokens: int
    source: KVDescriptor
    target: KVDescriptor
    frame_payload_bytes: int
    data_frames_per_request: int
    routes: dict[str, RouteGoodput] = field(default_factory=dict)

    def ratio(self, route: str) -> float:
        """Total goodput over the ceiling's."""
        ceiling = self.routes["ceiling"].gbps
        return self.routes[route].gbps / ceiling if ceiling else 0.0

    def paired_ratio(self, route: str) -> float:
        """Median over turns of (ceiling's time / this route's time) for the same request."""
        pairs = zip(self.routes["ceiling"].times, self.routes[route].times, strict=True)
        return statistics.median(c / r for c, r in pairs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "num_tokens": self.num_tokens,
            "source_layout": self.source.layout,
            "source_block": self.source.block_size,
            "target_layout": self.target.layout,
            "target_block": self.target.block_size,
            "dtype": self.source.dtype,
            "kv_geometry": {
                "layers": self.source.num_layers,
                "kv_heads": self.source.num_kv_heads,
                "head_dim": self.source.head_dim,
            },
            "frame_payload_bytes": self.frame_payload_bytes,
            "data_frames_per_request": self.data_frames_per_request,
            "routes": {
                name: {
                    "payload_bytes": r.payload_bytes,
                    "seconds": r.seconds,
                    "requests": len(r.times),
                    "gbps": r.gbps,
                    "ratio_to_ceiling": self.ratio(name),
                    "median_paired_ratio": self.paired_ratio(name),
                }
                for name, r in self.routes.items()
            },
        }


def auto_tokens(desc: KVDescriptor, max_frame_bytes: int, max_model_len: int) -> int:
    """The longest prompt decode can hold (one token to generate) that fills whole frames."""
    per_frame = frame_payload_limit(desc, max_frame_bytes) // desc.payload_nbytes(1)
    step = per_frame * desc.block_size
    limit = max_model_len - 1
    tokens = limit // step * step
    return tokens or limit // desc.block_size * desc.block_size or limit


async def send_kv_request(
    topo: BenchTopology, route: str, kv: SyntheticKV, engine: EngineCeiling | None = None
) -> float:
    """Reserve (untimed) and send one request's frames over `route`; seconds taken."""
    ids, bus = topo.ids, topo.bus
    rid = new_request_id(route)
    if route == "ceiling":
        return await send_stream(bus, ids["echo"], kv.frames(rid))
    if route == ENGINE_ROUTE:
        assert engine is not None
        return await engine.send()
    decode = ids["direct"] if route == "direct" else ids["conv_decode"]
    await reserve(bus, decode, bench_request(rid, kv.num_tokens, max_tokens=1))
    if route == "direct":
        return await send_stream(bus, decode, kv.frames(rid))
    frames = kv.frames(rid, dest_instance=decode, dest_desc=topo.kv("conv_decode"))
    return await send_stream(bus, ids["converter"], frames)


class EngineCeiling:
    """The Mooncake ceiling: every data frame's payload written engine to engine, one write
    at a time (as a stream's frames are), from registered memory into the sink's slots."""

    def __init__(self, topo: BenchTopology, kv: SyntheticKV):
        engine, sink = topo.bus.kv_engine, topo.mooncake_sink
        if engine is None or not sink:
            raise RuntimeError("the engine route needs the mooncake transport")
        self.engine, self.sink, self.kv = engine, sink, kv
        self.window, self.slot = topo.config.kv_window, topo.config.max_frame_bytes
        self.memory = engine.register(sum(len(p) for _, _, p in kv.pieces))
        self.pieces: list[tuple[int, int]] = []  # (address, bytes) of one layer's frames
        at = 0
        for _, _, payload in kv.pieces:
            self.memory.view[at : at + len(payload)] = payload
            self.pieces.append((self.memory.address + at, len(payload)))
            at += len(payload)

    async def send(self) -> float:
        session, base = self.sink["session"], self.sink["address"]
        write = self.engine.engine.transfer_sync_write
        start = time.perf_counter()
        n = 0
        for _ in self.kv.desc.layers:
            for src, nbytes in self.pieces:
                dst = base + n % self.window * self.slot
                rc = await asyncio.to_thread(write, session, src, dst, nbytes)
                if rc != 0:
                    raise RuntimeError(f"transfer-engine write to {session} failed: {rc}")
                n += 1
        return time.perf_counter() - start


async def measure_transfer(
    topo: BenchTopology,
    num_tokens: int | None = None,
    requests: int = 40,
) -> TransferResult:
    """Goodput (KV payload bytes / seconds from first frame sent to last acknowledged) per
    route, one request in flight at a time as one prefill worker sends them."""
    source, target = topo.kv("prefill"), topo.kv("conv_decode")
    frame_bytes = topo.config.max_frame_bytes
    if num_tokens is None:
        max_len = min(topo.info[n].max_model_len for n in ("direct", "conv_decode"))
        num_tokens = auto_tokens(source, frame_bytes, max_len)
    kv = SyntheticKV.build(source, num_tokens, frame_bytes)
    transport = topo.config.kv_transport
    routes = routes_for(transport)
    result = TransferResult(
        transport,
        num_tokens,
        source,
        target,
        len(kv.pieces[0][2]),
        kv.data_frames,
        {r: RouteGoodput(r, kv.payload_bytes) for r in routes},
    )
    engine = EngineCeiling(topo, kv) if ENGINE_ROUTE in routes else None
    for route in routes:  # warm-up: connections, code paths, the decode's allocator
        await send_kv_request(topo, route, kv, engine)
    for _ in range(requests):
        for route in routes:
            result.routes[route].times.append(await send_kv_request(topo, route, kv, engine))
    return result
