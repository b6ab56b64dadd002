"""`hetserve bench kv`: the KV path's three numbers from one run, each against its own
baseline measured in the same run (services/bench/kv_*.py hold the parts):

    convert   kv_convert   convert_layer per layout pair vs a torch clone of the same bytes
    transfer  kv_transfer  goodput direct / via converter vs the raw NATS request/reply ceiling,
                           per KV transport (nats; mooncake also vs the engine-to-engine ceiling)
    exposed   kv_exposed   KV transfer left exposed after the real prefill's compute

The issue's targets (issue 3): conversion >= 0.5x the copy for permute-only pairs; direct
>= 0.8x and via converter >= 0.4x the ceiling; exposed <= 30% of the transfer time. Issue 12's,
with mooncake: direct >= 0.8x the Mooncake ceiling and >= 4x nats direct, via the converter
>= 0.5x the Mooncake ceiling.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from proto.layout_registry import LAYOUTS
from services.bench.kv_convert import (
    ConvertResult,
    measure_case,
    pair_blocks,
    parse_dtype_pairs,
    plan_cases,
)
from services.bench.kv_exposed import ExposedResult, measure_exposed
from services.bench.kv_services import BenchTopology, TopologyConfig, build_tiny_model
from services.bench.kv_transfer import TransferResult, measure_transfer
from services.common.nats_server import NatsServer, find_nats_server
from services.common.settings import CommonSettings

SECTIONS = ("convert", "transfer", "exposed")
TRANSPORTS = ("nats", "mooncake")
Progress = Callable[[str], None]


@dataclass
class KVBenchConfig:
    sections: tuple[str, ...] = SECTIONS
    # (a) conversion
    layouts: tuple[str, ...] = ()  # () : every registered layout
    dtypes: str = "bfloat16,float32"  # items "dtype" or "source:target"
    tokens: tuple[int, ...] = (2048,)
    kv_heads: int = 8
    head_dim: int = 128
    tp: tuple[int, int] = (1, 1)
    repeats: int = 7
    threads: int = 1  # torch threads for (a); 0: torch's default
    # (b), (c): the services
    nats_url: str | None = None  # None: an embedded nats-server
    model: str | None = None  # None: build the tiny Llama in a temporary directory
    route: tuple[str, str] = ("vllm-flash", "ascend")  # prefill/direct layout, converted-to
    service_dtype: str = "float32"
    # the services' own defaults: the benchmark measures what a deployment runs
    max_frame_bytes: int = CommonSettings.model_fields["max_frame_bytes"].default
    window: int = CommonSettings.model_fields["kv_window"].default
    transfer_tokens: int | None = None  # None: the longest prompt that fills whole frames
    transfer_requests: int = 40  # per route, the routes taking turns
    prompt_tokens: int = 1024
    exposed_repeats: int = 5
    # (b) runs once per transport, each on its own services; (c) on the first one only
    transports: tuple[str, ...] = ("nats",)

    def check(self) -> None:
        """Raises ValueError on an inconsistent configuration."""
        unknown = set(self.sections) - set(SECTIONS)
        if unknown or not self.sections:
            raise ValueError(f"sections must be among {', '.join(SECTIONS)}")
        for name in (*self.layouts, *self.route):
            if name not in LAYOUTS:
                raise ValueError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}")
        if self.route[0] == self.route[1]:
            raise ValueError("the converter route needs two different layouts")
        if min(self.kv_heads, self.head_dim, self.repeats, *self.tp, *self.tokens) < 1:
            raise ValueError("kv heads, head dim, repeats, tp and tokens must be >= 1")
        if min(self.transfer_requests, self.prompt_tokens, self.exposed_repeats, self.window) < 1:
            raise ValueError("requests, prompt tokens, repeats and window must be >= 1")
        parse_dtype_pairs(self.dtypes)
        if not self.transports or set(self.transports) - set(TRANSPORTS):
            raise ValueError(f"transports must be among {', '.join(TRANSPORTS)}")


@dataclass
class KVReport:
    config: KVBenchConfig
    machine: dict[str, Any]
    convert: list[ConvertResult] = field(default_factory=list)
    convert_skipped: list[str] = field(default_factory=list)
    transfers: dict[str, TransferResult] = field(default_factory=dict)  # per transport
    exposures: dict[str, ExposedResult] = field(default_factory=dict)  # per transport
    seconds: float = 0.0

    @property
    def transfer(self) -> TransferResult | None:
        """The first transport's."""
        return next(iter(self.transfers.values()), None)

    @property
    def exposed(self) -> ExposedResult | None:
        """The first transport's."""
        return next(iter(self.exposures.values()), None)


def machine_info(threads: int) -> dict[str, Any]:
    try:
        nats_version = subprocess.run(
            [find_nats_server(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        nats_version = "unknown"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": cpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_convert": threads or torch.get_num_threads(),
        "nats_server": nats_version,
        "load_average_start": list(os.getloadavg()),
    }


def run_conversions(
    config: KVBenchConfig, progress: Progress
) -> tuple[list[ConvertResult], list[str]]:
    layouts = config.layouts or tuple(LAYOUTS)
    cases, skipped = plan_cases(layouts, parse_dtype_pairs(config.dtypes), config.tokens, config.tp)
    before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        results = []
        for i, case in enumerate(cases):
            if i % 20 == 0:
                progress(f"convert: case {i + 1}/{len(cases)}")
            results.append(
                measure_case(
                    case, config.kv_heads, config.head_dim, config.max_frame_bytes, config.repeats
                )
            )
        return results, skipped
    finally:
        torch.set_num_threads(before)


async def run_bus_sections(
    config: KVBenchConfig, report: KVReport, workdir: Path, progress: Progress
) -> None:
    server = None
    url = config.nats_url
    if url is None:
        server = NatsServer().start()
        url = server.url
    try:
        model = Path(config.model) if config.model else build_tiny_model(workdir / "tiny-llama")
        for transport in config.transports:
            topology = _topology(config, url, model, workdir / transport, transport)
            progress(f"{transport}: starting prefill, two decode instances, converter and echo")
            async with BenchTopology(topology) as topo:
                if "transfer" in config.sections:
                    progress(f"{transport} transfer: ceiling(s), direct, converter")
                    report.transfers[transport] = await measure_transfer(
                        topo, config.transfer_tokens, config.transfer_requests
                    )
                if "exposed" in config.sections:
                    progress(f"{transport} exposed: prompts through the real prefill worker")
                    report.exposures[transport] = await measure_exposed(
                        topo, config.prompt_tokens, config.exposed_repeats
                    )
    finally:
        if server is not None:
            server.stop()


def _topology(
    config: KVBenchConfig, url: str, model: Path, log_dir: Path, transport: str
) -> TopologyConfig:
    src, dst = (LAYOUTS[n] for n in config.route)
    src_block, dst_block = pair_blocks(src, dst)
    log_dir.mkdir(parents=True, exist_ok=True)
    return TopologyConfig(
        nats_url=url,
        model_dir=model,
        log_dir=log_dir,
        source_layout=src.name,
        target_layout=dst.name,
        source_block=src_block,
        target_block=dst_block,
        kv_dtype=config.service_dtype,
        max_frame_bytes=config.max_frame_bytes,
        kv_window=config.window,
        kv_transport=transport,
    )


def run_kv_bench(config: KVBenchConfig, progress: Progress | None = None) -> KVReport:
    """The whole run; services' logs go to a temporary directory, kept only on failure."""
    config.check()
    say = progress or (lambda text: print(f"bench kv: {text}", file=sys.stderr))
    started = time.perf_counter()
    report = KVReport(config=config, machine=machine_info(config.threads))
    if "convert" in config.sections:
        report.convert, report.convert_skipped = run_conversions(config, say)
    if {"transfer", "exposed"} & set(config.sections):
        workdir = Path(tempfile.mkdtemp(prefix="hetserve-bench-kv-"))
        try:
            asyncio.run(run_bus_sections(config, report, workdir, say))
        except BaseException:
            say(f"the services' logs are kept in {workdir}")
            raise
        shutil.rmtree(workdir, ignore_errors=True)
    report.machine["load_average_end"] = list(os.getloadavg())
    report.seconds = time.perf_counter() - started
    return report
