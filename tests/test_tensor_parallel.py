"""Tensor parallelism in the native engine: gloo worlds of 2 and 4 spawned processes (one
engine per rank, run in lockstep by services/engine/tp) against transformers, against tp=1, and
each rank's KV cache against the head slice of the tp=1 cache."""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from proto.kv_descriptor import KVDescriptor
from services.bench.oracle import hf_greedy
from services.common.nats_server import free_port
from services.engine.engine import NativeEngine
from services.engine.model import CausalLM
from services.engine.parallel import TPGroup, kv_heads_of_rank
from services.engine.tp.leader import LeaderEngine
from services.hf.config import load_model_config
from tests import tp_workers
from tests.system import make_model

# model -> None if it runs at that TP degree, else the error every rank must raise
WORLDS: dict[int, dict[str, str | None]] = {
    2: {"llama": None, "qwen2": None},  # 2 KV heads: one per rank
    4: {"llama": None, "mistral": None, "qwen2": "6 attention heads"},  # KV heads replicated
}
# Not bit-exact, already at layer 0 (a rank's qkv matmul has another shape than tp=1's, so
# another blocking), and later layers add all-reduced partial sums: max |diff| seen ~1e-6.
KV_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@dataclass
class TPRun:
    size: int
    results: dict[str, list[dict[str, Any]]]  # model -> per rank
    refusals: list[str]  # per rank: the error of engines built with different block counts


@pytest.fixture(scope="module")
def models(tiny_llama: Path, tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    mistral = make_model(tmp_path_factory.mktemp("tp-models") / "mistral", arch="mistral")
    return {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": mistral}


def spawn(args: tuple, nprocs: int, timeout_s: float) -> None:
    """Ranks are forked from a fresh server process that imported torch and the engine once,
    before any torch computation (so no thread pool is forked): every rank starts clean
    without paying for the imports again."""
    multiprocessing.get_context("forkserver").set_forkserver_preload([tp_workers.__name__])
    context = mp.start_processes(
        tp_workers.run_rank, args=args, nprocs=nprocs, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"tp world of {nprocs} did not finish in {timeout_s}s")


@dataclass
class Reference:
    """tp=1 engine and transformers results for one model, computed once."""

    hf_tokens: list[list[int]]  # for PROMPTS
    hf_imported: list[int]  # for IMPORTED_PROMPT
    tp1_tokens: list[list[int]]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # KV_PROMPT's KV, all heads, per layer
    imported: dict[str, Any]  # IMPORTED_PROMPT's first token and KV: what ranks import


@pytest.fixture(scope="module")
def references(models: dict) -> dict[str, Reference]:
    out = {}
    for name, model in models.items():
        engine = tp1_engine(model)
        n = tp_workers.NEW_TOKENS
        out[name] = Reference(
            hf_tokens=[hf_greedy(model, p, n) for p in tp_workers.PROMPTS],
            hf_imported=hf_greedy(model, tp_workers.IMPORTED_PROMPT, n),
            tp1_tokens=tp_workers.generate(engine, tp_workers.PROMPTS),
            kv=tp_workers.reference_kv(engine, tp_workers.KV_PROMPT)["kv"],
            imported=tp_workers.reference_kv(engine, tp_workers.IMPORTED_PROMPT),
        )
    return out


@pytest.fixture(scope="module", params=sorted(WORLDS), ids=lambda size: f"tp{size}")
def world(
    request: pytest.FixtureRequest,
    models: dict,
    references: dict[str, Reference],
    tmp_path_factory: pytest.TempPathFactory,
) -> TPRun:
    size = request.param
    out = tmp_path_factory.mktemp(f"tp{size}")
    names = {name: str(models[name]) for name in WORLDS[size]}
    for name in names:
        torch.save(references[name].imported, out / f"ref-{name}.pt")
    spawn((size, free_port(), str(out), names), size, timeout_s=90)

    def per_rank(name: str) -> list[Any]:
        return [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(size)]

    return TPRun(size, {name: per_rank(name) for name in names}, per_rank("mismatch"))


def runnable(run: TPRun) -> list[str]:
    return [name for name, error in WORLDS[run.size].items() if error is None]


def tp1_engine(model: Path) -> NativeEngine:
    return NativeEngine(model, tp_workers.LAYOUT, tp_workers.BLOCK, "float32", 64, "cpu")


def test_greedy_tokens_equal_transformers_and_tp1(world: TPRun, references: dict) -> None:
    for name in runnable(world):
        leader, want = world.results[name][0], references[name]
        assert leader["tokens"] == want.hf_tokens == want.tp1_tokens, name
        assert leader["imported_tokens"] == want.hf_imported, name


def test_invalid_head_split_is_refused_on_every_rank(world: TPRun) -> None:
    for name, error in WORLDS[world.size].items():
        if error is not None:
            assert all(error in rank.get("error", "") for rank in world.results[name]), name


def test_each_rank_caches_exactly_its_kv_heads(world: TPRun, references: dict) -> None:
    """Every layer's K and V of a rank equal the tp=1 cache's slice of the heads that the
    KV descriptor assigns to the rank, within float32 rounding (KV_TOLERANCE)."""
    for name in runnable(world):
        full = references[name].kv
        for rank, result in enumerate(world.results[name]):
            heads = descriptor_heads(full[0][0].shape[1], world.size, rank)
            assert result["heads"] == list(heads) and result["kv_heads"] == len(heads)
            assert sorted(result["kv"]) == sorted(full)
            for layer, (k, v) in result["kv"].items():
                want_k, want_v = (t[:, heads.start : heads.stop] for t in full[layer])
                torch.testing.assert_close(k, want_k, **KV_TOLERANCE)
                torch.testing.assert_close(v, want_v, **KV_TOLERANCE)


def test_follower_callbacks_fire_for_every_layer_on_every_rank(world: TPRun) -> None:
    for name in runnable(world):
        layers = list(range(len(world.results[name][0]["kv"])))
        for result in world.results[name][1:]:
            seen = result["layers"]
            assert sorted(seen) == ["fail", "g0", "g1", "g2", "kv"]
            assert all(seen[rid] == layers for rid in ["g0", "g1", "g2", "kv"])
            assert seen["fail"] == [0, 1]  # raised at layer 1, skipped after, step completed


def test_a_failing_callback_raises_on_the_leader_after_the_step(world: TPRun) -> None:
    for name in runnable(world):
        assert world.results[name][0]["callback_error"] == "frame sender gone"


def test_followers_mirror_block_tables_without_allocating(world: TPRun) -> None:
    for name in runnable(world):
        for result in world.results[name][1:]:
            assert result["tables_left"] == 0  # every finished request was released
            assert result["allocator_untouched"]


def test_ranks_with_different_engines_all_refuse_to_start(world: TPRun) -> None:
    errors = world.refusals
    assert len(set(errors)) == 1 and "num_blocks" in errors[0]
    assert all(f"{rank}: ['num_blocks']" in errors[0] for rank in range(1, world.size))


def descriptor_heads(num_kv_heads: int, tp_size: int, tp_rank: int) -> range:
    """The wire contract's rule: the heads a KV frame of this shard carries."""
    return KVDescriptor(
        layout="vllm-flash",
        block_size=16,
        dtype="float32",
        num_layers=1,
        num_kv_heads=num_kv_heads,
        head_dim=32,
        tp_size=tp_size,
        tp_rank=tp_rank,
    ).heads


def test_kv_heads_of_rank_is_the_descriptors_rule() -> None:
    for kv_heads in range(1, 9):
        for size in range(1, 17):
            if max(size, kv_heads) % min(size, kv_heads):
                with pytest.raises(ValueError):
                    kv_heads_of_rank(kv_heads, TPGroup(0, size))
                continue
            for rank in range(size):
                want = descriptor_heads(kv_heads, size, rank)
                assert kv_heads_of_rank(kv_heads, TPGroup(rank, size)) == want


@pytest.mark.parametrize(
    ("size", "error"), [(4, "6 attention heads"), (3, "not a multiple of the 2 KV heads")]
)
def test_qwen2_head_splits_that_do_not_divide_raise(
    tiny_qwen2: Path, size: int, error: str
) -> None:
    cfg = load_model_config(tiny_qwen2)
    with torch.device("meta"), pytest.raises(ValueError, match=error):
        CausalLM(cfg, TPGroup(0, size))


def test_tp_above_one_needs_torch_distributed(tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        NativeEngine(tiny_llama, "vllm-flash", 16, "float32", 8, "cpu", tp_rank=0, tp_size=2)


def test_tp1_calls_no_torch_distributed(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.distributed called at tp=1")

    for name in ("all_reduce", "broadcast_object_list", "gather_object", "is_initialized"):
        monkeypatch.setattr(dist, name, refuse)
    engine = tp1_engine(tiny_llama)
    leader = LeaderEngine(engine, None)
    tokens = tp_workers.generate(leader, tp_workers.PROMPTS[:2])
    assert tokens == tp_workers.generate(engine, tp_workers.PROMPTS[:2])
    assert leader.ready_everywhere(["a"]) == ["a"]
    leader.stop()
