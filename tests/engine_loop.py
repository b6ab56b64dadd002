"""Drive an engine the way the decode worker does, for tests: requests join a running batch
every few steps and leave when done. No pytest or transformers here: spawned TP ranks use it."""

from __future__ import annotations

from proto.messages import GenerateRequest
from services.engine.engine import NativeEngine
from services.engine.tp.leader import LeaderEngine


def generate_batched(
    engine: NativeEngine,
    requests: list[GenerateRequest],
    join_every: int = 0,
    steps: LeaderEngine | None = None,
) -> list[list[int]]:
    """Prefill each request (staggered by `join_every` decode steps), decode as one batch;
    `steps` runs the steps (a tensor-parallel leader), default the engine itself."""
    runner = steps or engine
    waiting = list(requests)
    running, done = [], {}
    step = 0
    while waiting or running:
        if waiting and (join_every == 0 or step % join_every == 0):
            req = waiting.pop(0)
            seq = engine.new_sequence(req)
            seq.block_table = engine.blocks.allocate(
                engine.blocks_for(len(req.prompt_token_ids) + req.sampling.max_tokens)
            )
            runner.prefill(seq)
            running.append(seq)
        live = [s for s in running if not s.finished]
        if live:
            runner.decode(live)
        for seq in [s for s in running if s.finished]:
            engine.blocks.free(seq.block_table)
            done[seq.request_id] = seq.output_ids
            running.remove(seq)
        step += 1
    return [done[r.request_id] for r in requests]
