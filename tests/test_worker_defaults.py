"""Every worker field left out gets a value its engine and layout accept: a topology entry or a
HETSERVE_* environment with only an engine (and a layout) starts. vLLM on CPU refuses block
sizes that are not multiples of 32, and refuses to start when its KV cache cannot hold one
max_model_len sequence; a native cache of 1024 blocks of 128 tokens would be 6 GiB for SmolLM2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proto.layout_registry import LAYOUTS
from services.backends.vllm import engine_args as vllm_engine
from services.cli.launcher import worker_env
from services.cli.preflight import check_topology
from services.cli.topology import Topology, WorkerSpec
from services.common.settings import DEFAULT_CACHE_TOKENS, WorkerSettings
from services.engine.engine import NativeEngine
from services.hf.config import load_model_config

VLLM_LAYOUTS = ("vllm-cpu", "vllm-lbnhc", "vllm-lbhnc")  # what a vLLM 0.32 instance can read


def settings_from(spec: WorkerSpec, model: Path, monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    """The settings `hetserve up` gives the worker a topology entry describes."""
    topology = Topology(model=str(model), prefill=[spec], decode=[spec])
    for key, value in worker_env(topology, spec).items():
        monkeypatch.setenv(key, value)
    return WorkerSettings()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_native_defaults_fit_every_layout(
    layout: str, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = WorkerSpec(name="w", kv_layout=layout)
    assert spec.block_size in LAYOUTS[layout].block_sizes
    assert spec.dtype in LAYOUTS[layout].dtypes
    assert spec.num_blocks * spec.block_size >= DEFAULT_CACHE_TOKENS
    assert spec.num_blocks * spec.block_size < DEFAULT_CACHE_TOKENS + spec.block_size
    settings = settings_from(spec, tiny_llama, monkeypatch)
    assert (settings.kv_layout, settings.block_size) == (layout, spec.block_size)
    engine = NativeEngine(
        tiny_llama,
        settings.kv_layout,
        settings.block_size,
        settings.kv_dtype,
        settings.num_blocks,
        "cpu",
    )
    assert engine.blocks.num_total > 0


def test_native_defaults_without_a_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = WorkerSpec(name="w")
    assert (spec.kv_layout, spec.block_size, spec.num_blocks) == ("vllm-flash", 16, 1024)
    assert WorkerSpec(name="w", kv_layout="ascend").block_size == 128
    assert WorkerSpec(name="w", kv_layout="ascend-310p").block_size == 64
    for key in ("HETSERVE_ENGINE", "HETSERVE_KV_LAYOUT", "HETSERVE_BLOCK_SIZE"):
        monkeypatch.delenv(key, raising=False)
    settings = WorkerSettings()
    assert (settings.kv_layout, settings.block_size, settings.num_blocks) == (
        "vllm-flash",
        16,
        1024,
    )
    monkeypatch.setenv("HETSERVE_KV_LAYOUT", "gaudi")
    assert (WorkerSettings().block_size, WorkerSettings().num_blocks) == (128, 128)


@pytest.mark.parametrize("layout", ["", *VLLM_LAYOUTS])
def test_vllm_defaults_are_what_vllm_accepts(
    layout: str, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = WorkerSpec(name="v", engine="vllm", kv_layout=layout)
    assert spec.kv_layout == layout and spec.block_size == 32
    settings = settings_from(spec, tiny_llama, monkeypatch)
    assert (settings.kv_layout, settings.block_size) == (layout, 32)
    if vllm_engine.vllm_missing_reason() is None:
        vllm_engine.check_model(settings)  # vLLM's own head-size and block-size rules


def test_vllm_settings_alone_default_to_what_vllm_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HETSERVE_KV_LAYOUT", "HETSERVE_BLOCK_SIZE", "HETSERVE_NUM_BLOCKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HETSERVE_ENGINE", "vllm")
    settings = WorkerSettings()
    assert (settings.kv_layout, settings.block_size, settings.num_blocks) == ("", 32, 512)


def test_vllm_kv_cache_holds_one_max_length_sequence(
    smollm2: dict[str, Path], tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HETSERVE_VLLM_KV_CACHE_GIB", raising=False)
    model = smollm2["float32"]
    cfg = load_model_config(model)
    settings = WorkerSettings(model=str(model), engine="vllm")
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    need = cfg.max_position_embeddings * per_token
    assert need > 0.25 * 2**30  # the old fixed 0.25 GiB failed vLLM's start-up check
    assert vllm_engine.kv_cache_bytes(settings, cfg) >= need
    short = WorkerSettings(model=str(model), engine="vllm", max_model_len=1024)
    assert vllm_engine.kv_cache_bytes(short, cfg) == int(0.25 * 2**30)
    tiny = WorkerSettings(model=str(tiny_llama), engine="vllm")
    assert vllm_engine.kv_cache_bytes(tiny, load_model_config(tiny_llama)) == int(0.25 * 2**30)
    given = WorkerSettings(model=str(model), engine="vllm", vllm_kv_cache_gib=1)
    assert vllm_engine.kv_cache_bytes(given, cfg) == 2**30
    auto = WorkerSettings(model=str(model), engine="vllm", vllm_kv_cache_gib=0)
    assert vllm_engine.kv_cache_bytes(auto, cfg) is None  # gpu_memory_utilization decides


def test_a_block_size_the_layout_refuses_is_still_an_error(
    tiny_llama: Path, tmp_path: Path
) -> None:
    # the checks before `hetserve up` (services/cli/preflight) refuse it, naming the field
    topology = {
        "model": str(tiny_llama),
        "prefill": [{"name": "p"}],
        "decode": [{"name": "w", "kv_layout": "ascend", "block_size": 16}],
    }
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(topology))
    _, report = check_topology(path, ports=False)
    assert [(p.field, p.problem) for p in report.problems] == [
        ("decode[0].block_size", "w: layout ascend takes block sizes 128, not 16")
    ]
    with pytest.raises(ValueError, match="at least 2"):
        WorkerSettings(num_blocks=1)
