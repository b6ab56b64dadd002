"""Shared fixtures: a baseline spec and a way to run the planner's CLI without the project's."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import pytest

from services.planner.cli import register

BASE_SPEC: dict[str, Any] = {
    "model": "llama-3-70b",
    "inventory": [
        {"gpu": "h100-sxm", "count": 16, "price_per_hour": 4.0},
        {"gpu": "mi300x", "count": 8, "price_per_hour": 3.5},
        {"gpu": "ascend-910b", "count": 16, "price_per_hour": 1.8},
    ],
    "network": {"inter_pool_gbps": 100},
    "workload": {"rate": 5.0, "prompt_tokens": {"mean": 2048}, "output_tokens": {"mean": 256}},
    "slo": {"ttft_s": 1.0, "tpot_s": 0.05, "percentile": 90, "attainment": 0.9},
    "simulation": {"requests": 1000},
}


@pytest.fixture
def base_spec() -> dict[str, Any]:
    return copy.deepcopy(BASE_SPEC)


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Parse argv with a tiny parser that only knows the planner's subcommands, run the
    chosen function, and return (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        parser = argparse.ArgumentParser(prog="hetserve")
        register(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(list(argv))
        code = args.func(args)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
