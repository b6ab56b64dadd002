"""What each rank of a tensor-parallel test instance runs, in its own spawned process.

Kept apart from the test module so a spawned rank imports no pytest fixtures or transformers.
Each rank writes what the test checks to `<out>/<model>-rank<r>.pt`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch

from proto.kv_descriptor import KVDescriptor
from proto.messages import GenerateRequest, SamplingParams
from services.engine.engine import NativeEngine
from services.engine.model import LayerDone
from services.engine.tp.follower import Follower
from services.engine.tp.leader import LeaderEngine
from services.engine.tp.steps import BlockTables, PrefillStep
from services.engine.tp.world import TPWorld, init_tp
from services.kv.payload import payload_from_tokens, payload_to_tokens
from tests.engine_loop import generate_batched

LAYOUT, BLOCK, BLOCKS = "vllm-flash", 16, 64
PROMPTS = [[5, 77, 300, 12, 9, 401, 33, 900, 17] * 3, [50], list(range(100, 290))]
NEW_TOKENS = 16
KV_PROMPT = list(range(40, 77))  # 37 tokens: three blocks, the last one partly filled
IMPORTED_PROMPT = [7, 300, 41, 22, 500, 9, 81, 64, 3, 15] * 2


def request(rid: str, prompt: list[int], max_tokens: int = NEW_TOKENS) -> GenerateRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=params)


def generate(runner: NativeEngine | LeaderEngine, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of `prompts`, one joining the running batch every other decode step."""
    requests = [request(f"g{i}", p) for i, p in enumerate(prompts)]
    engine = runner.engine if isinstance(runner, LeaderEngine) else runner
    return generate_batched(engine, requests, join_every=2, steps=runner)


class KVRecorder:
    """A per-layer callback as a prefill service would pass: export this rank's blocks of the
    layer (here kept as (T, H, D) tokens instead of being sent as frames)."""

    def __init__(self, engine: NativeEngine, block_table: list[int], num_tokens: int):
        self.engine, self.block_table, self.num_tokens = engine, block_table, num_tokens
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer: int) -> None:
        payload = self.engine.cache.export_blocks(layer, self.block_table)
        self.kv[layer] = payload_to_tokens(self.engine.kv, payload, self.num_tokens)


def reference_kv(engine: NativeEngine, prompt: list[int]) -> dict[str, Any]:
    """Prefill `prompt` on a tp=1 engine: its first token and every layer's (T, H, D) K, V."""
    seq = engine.new_sequence(request("ref", prompt, 1))
    seq.block_table = engine.blocks.allocate(engine.blocks_for(len(prompt)))
    recorder = KVRecorder(engine, seq.block_table, len(prompt))
    first = engine.prefill(seq, recorder)
    engine.blocks.free(seq.block_table)
    return {"first": first, "kv": recorder.kv}


def shard_payloads(reference: dict[str, Any], shard: KVDescriptor) -> dict[int, dict]:
    """Per layer, the KV of `shard`'s heads laid out as `shard`'s payload: what a converter
    delivers to this rank from a tp=1 prefill."""
    heads = slice(shard.heads.start, shard.heads.stop)
    return {
        layer: payload_from_tokens(shard, k[:, heads], v[:, heads])
        for layer, (k, v) in reference["kv"].items()
    }


def import_shard(
    engine: NativeEngine, tables: BlockTables, request_id: str, payloads: dict, ready: set[str]
) -> None:
    """A follower's receiving side, on a thread of its own while the step loop runs: wait
    for the request's blocks, import every layer of this rank's shard, report it ready."""
    blocks = tables.wait(request_id, timeout=30)[: engine.blocks_for(len(IMPORTED_PROMPT))]
    for layer, payload in payloads.items():
        engine.cache.import_blocks(layer, blocks, payload)
    ready.add(request_id)


def run_rank(rank: int, size: int, port: int, out: str, models: dict[str, str]) -> None:
    torch.set_num_threads(1)
    world = init_tp(rank, size, "127.0.0.1", port, "gloo")
    try:
        for name, model_dir in models.items():
            reference = torch.load(Path(out) / f"ref-{name}.pt")
            result = run_model(world, model_dir, reference)
            torch.save(result, Path(out) / f"{name}-rank{rank}.pt")
        mismatch = check_mismatched_blocks(world, next(iter(models.values())))
        torch.save(mismatch, Path(out) / f"mismatch-rank{rank}.pt")
    finally:
        world.close()


def run_model(world: TPWorld, model_dir: str, reference: dict[str, Any]) -> dict[str, Any]:
    try:
        engine = NativeEngine(model_dir, LAYOUT, BLOCK, "float32", BLOCKS, **world.engine_kwargs())
    except ValueError as exc:  # the same on every rank, before any collective
        return {"error": str(exc)}
    payloads = shard_payloads(reference, engine.kv)
    result: dict[str, Any] = {
        "heads": list(engine.kv.heads),
        "kv_heads": engine.cache.views[0][0].shape[2],
    }
    if world.rank == 0:
        result.update(lead(engine, world, reference["first"], payloads))
    else:
        result.update(follow(engine, world, payloads))
    return result


def check_mismatched_blocks(world: TPWorld, model_dir: str) -> str:
    """Ranks configured with different block counts: every rank must refuse to start."""
    engine = NativeEngine(
        model_dir, LAYOUT, BLOCK, "float32", 8 + world.rank, **world.engine_kwargs()
    )
    try:
        if world.rank == 0:
            LeaderEngine(engine, world.control)
        else:
            Follower(engine, world.control)
    except ValueError as exc:
        return str(exc)
    return ""


def lead(engine: NativeEngine, world: TPWorld, first: int, payloads: dict) -> dict[str, Any]:
    with LeaderEngine(engine, world.control) as leader:
        tokens = generate(leader, PROMPTS)
        # the KV of one prompt, as this rank's prefill callback exports it
        table = leader.engine.blocks.allocate(leader.engine.blocks_for(len(KV_PROMPT)))
        seq = leader.engine.new_sequence(request("kv", KV_PROMPT, 1))
        seq.block_table = table
        recorder = KVRecorder(engine, table, len(KV_PROMPT))
        leader.prefill(seq, recorder, extra={"kv": True})
        callback_error = prefill_with_failing_callbacks(leader, table)
        leader.engine.blocks.free(table)
        imported = decode_imported(leader, first, payloads)
    return {
        "tokens": tokens,
        "kv": recorder.kv,
        "imported_tokens": imported,
        "callback_error": callback_error,
    }


def fail_at_layer_1(layer: int) -> None:
    if layer == 1:
        raise RuntimeError("frame sender gone")


def prefill_with_failing_callbacks(leader: LeaderEngine, table: list[int]) -> str:
    """Every rank's callback fails mid-prefill: the step still completes everywhere, the
    leader raises afterwards, and the instance goes on (decode_imported runs next)."""
    seq = leader.engine.new_sequence(request("fail", KV_PROMPT, 1))
    seq.block_table = table
    try:
        leader.prefill(seq, fail_at_layer_1, extra={"fail": True})
    except RuntimeError as exc:
        return str(exc)
    return ""


def decode_imported(leader: LeaderEngine, first: int, payloads: dict) -> list[int]:
    """Decode side: KV arrives per rank (no prefill here), every rank imports its shard from
    another thread, and the request joins decode once it is ready everywhere."""
    seq = leader.engine.new_sequence(request("imp", IMPORTED_PROMPT))
    seq.block_table = leader.engine.blocks.allocate(
        leader.engine.blocks_for(len(IMPORTED_PROMPT) + NEW_TOKENS)
    )
    leader.share_blocks(seq.request_id, seq.block_table)
    prompt_blocks = seq.block_table[: leader.engine.blocks_for(len(IMPORTED_PROMPT))]
    for layer, payload in payloads.items():
        leader.engine.cache.import_blocks(layer, prompt_blocks, payload)
    deadline = time.monotonic() + 30
    while leader.ready_everywhere([seq.request_id]) != [seq.request_id]:
        if time.monotonic() > deadline:
            raise TimeoutError("followers never imported their KV")
        time.sleep(0.02)
    seq.append(first)
    while not seq.finished:
        leader.decode([seq])
    leader.engine.blocks.free(seq.block_table)
    return seq.output_ids


def follow(engine: NativeEngine, world: TPWorld, payloads: dict) -> dict[str, Any]:
    layers: dict[str, list[int]] = {}
    recorders: list[KVRecorder] = []

    def factory(step: PrefillStep) -> LayerDone:
        [row] = step.rows  # the tests prefill one sequence per step
        seen = layers.setdefault(row.request_id, [])
        recorder = KVRecorder(engine, row.input.block_table, row.num_tokens)
        if row.extra == {"kv": True}:
            recorders.append(recorder)

        def on_layer_done(layer: int) -> None:
            seen.append(layer)
            if row.extra == {"kv": True}:
                recorder(layer)
            if row.extra == {"fail": True}:
                fail_at_layer_1(layer)

        return on_layer_done

    ready: set[str] = set()
    follower = Follower(engine, world.control, factory, is_ready=ready.__contains__)
    importer = threading.Thread(
        target=import_shard, args=(engine, follower.tables, "imp", payloads, ready), daemon=True
    )
    importer.start()
    follower.run()
    return {
        "layers": layers,
        "kv": recorders[0].kv,
        "tables_left": len(follower.tables),
        "allocator_untouched": engine.blocks.num_free == engine.blocks.num_total,
    }
