"""A real `hetserve up` (embedded NATS, tiny-llama): a decode process killed with SIGKILL
is restarted and serves again; Ctrl-C (SIGINT to the process group) stops everything in
under 3 s with no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from services.common.nats_server import free_port
from tests.system import ROOT

pytestmark = pytest.mark.slow


def _children(pid: int) -> dict[str, int]:
    out = subprocess.run(["pgrep", "-a", "-P", str(pid)], capture_output=True, text=True)
    found = {}
    for line in out.stdout.splitlines():
        child, *cmd = line.split()
        found[cmd[-1]] = int(child)
    return found


def _wait_for(log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _complete(port: int) -> str:
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            r = client.completions.create(
                model="tiny-llama", prompt="hello", max_tokens=4, temperature=0
            )
            return r.choices[0].text
        except openai.APIError:
            assert time.monotonic() < deadline
            time.sleep(1)


def test_a_killed_instance_comes_back_and_ctrl_c_is_quick(tmp_path: Path, tiny_llama: Path) -> None:
    topology = tmp_path / "t.yaml"
    topology.write_text(
        f"model: {tiny_llama}\n"
        "prefill: [{name: p, engine: native, kv_layout: vllm-cpu, block_size: 32}]\n"
        "decode: [{name: d, engine: native, kv_layout: vllm-cpu, block_size: 32}]\n"
    )
    port = free_port()
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--topology", str(topology),
             "--port", str(port), "--state-dir", str(tmp_path / "state")],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for(log, "instances ready in", 180)
        before = _complete(port)
        os.kill(_children(up.pid)["decode"], signal.SIGKILL)
        _wait_for(log, "restarting d-0 (decode)", 30)
        assert _complete(port) == before
        mark = len(log.read_text())
        started = time.monotonic()
        os.killpg(up.pid, signal.SIGINT)
        up.wait(10)
        took = time.monotonic() - started
        tail = log.read_text()[mark:]
        assert took < 3.0, tail
        assert "Traceback" not in tail, tail
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
