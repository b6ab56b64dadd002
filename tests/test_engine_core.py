"""The engine core without NATS: the block manager's holds and prefix hashes, the
scheduler's step plans (batched and chunked prefill, decode growth, preemption), and
batched, chunked and prefix-cached prefill against Hugging Face transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.messages import GenerateRequest, SamplingParams
from proto.prefix_hash import block_hashes
from services.bench.oracle import hf_greedy
from services.engine.block_manager import BlockManager, OutOfBlocks
from services.engine.engine import NativeEngine
from services.engine.scheduler import Scheduler
from services.engine.sequence import Sequence
from services.engine.stopping import StopChecker


def request(rid: str, prompt: list[int], max_tokens: int = 8) -> GenerateRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=params)


def bare_sequence(rid: str, prompt: list[int], max_tokens: int = 8) -> Sequence:
    req = request(rid, prompt, max_tokens)
    return Sequence.from_request(req, [], None, sampler=None)


# -- block manager ---------------------------------------------------------------------


def test_blocks_are_held_and_freed_by_count() -> None:
    blocks = BlockManager(8, 4, reserved=1)
    assert blocks.num_total == blocks.num_free == 7
    first = blocks.allocate(3)
    assert 0 not in first and blocks.num_free == 4
    with pytest.raises(OutOfBlocks):
        blocks.allocate(5)
    blocks.free(first)
    assert blocks.num_free == 7
    with pytest.raises(ValueError, match="not held"):
        blocks.free(first[:1])


def test_prefix_hashes_chain_over_the_whole_prefix() -> None:
    a = block_hashes(list(range(12)), 4)
    b = block_hashes([99, *range(1, 12)], 4)
    assert len(a) == 3 and a[0] != b[0]
    assert a[1] != b[1], "a block's hash names the prefix before it too"
    assert block_hashes(list(range(13)), 4) == a, "a partial block has no hash"


def test_a_cached_prefix_is_shared_and_evicted_least_recently_freed_first() -> None:
    blocks = BlockManager(6, 4, prefix_caching=True)
    tokens = list(range(10))
    table = blocks.allocate(3)
    blocks.cache_prefix(table, tokens)  # two full blocks
    assert blocks.num_cached == 2
    shared = blocks.match_prefix(tokens + [7, 7])
    assert shared == table[:2], "the same prefix finds the same blocks"
    assert blocks.match_prefix([1] + tokens[1:]) == []
    blocks.free(table)
    assert blocks.num_free == 4, "still held by the second request"
    blocks.free(shared)
    assert blocks.num_free == 6 and blocks.num_cached == 2, "free, and still cached"
    fresh = blocks.allocate(4)  # least recently freed first: the uncached blocks
    assert set(fresh).isdisjoint(table[:2]) and blocks.num_cached == 2
    blocks.allocate(2)
    assert blocks.num_cached == 0, "handing a cached block out forgets its prefix"
    assert blocks.match_prefix(tokens) == []


def test_a_prefix_for_a_larger_block_sender_is_whole_runs_of_blocks() -> None:
    """A decode of 2-token blocks holding 3 blocks of the prompt, fed by a prefill of 4-token
    blocks: the stream can begin at token 4, not 6 (inside the prefill's second block; CI's
    vLLM block 32 -> native block 16 failure)."""
    blocks = BlockManager(8, 2, prefix_caching=True)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    table = blocks.allocate(4)
    blocks.cache_prefix(table[:3], tokens[:6])
    assert blocks.match_prefix(tokens) == table[:3]
    assert blocks.match_prefix(tokens, multiple=2) == table[:2]
    assert blocks.match_prefix(tokens[:3], multiple=2) == [], "one block is no whole run"
    blocks.free(table[:3])
    blocks.free(table[:2])
    blocks.free(table)
    assert blocks.num_free == 8, "the blocks left out of a match are not held"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6)), min_size=1, max_size=40))
def test_holds_never_leak(ops: list[tuple[bool, int]]) -> None:
    blocks = BlockManager(16, 2, prefix_caching=True)
    held: list[list[int]] = []
    for allocate, n in ops:
        if allocate and n <= blocks.num_free:
            table = blocks.allocate(n)
            blocks.cache_prefix(table, list(range(2 * n)))
            held.append(table + blocks.match_prefix(list(range(2 * n))))
        elif held:
            blocks.free(held.pop(0))
    for table in held:
        blocks.free(table)
    assert blocks.num_free == blocks.num_total


# -- scheduler ---------------------------------------------------------------------------


def test_prefill_is_batched_and_chunked_under_a_token_budget() -> None:
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_batch_size=8, max_batched_tokens=10, decodes=False)
    long, short = bare_sequence("long", list(range(23))), bare_sequence("short", [1, 2, 3])
    sched.add(long)
    sched.add(short)
    steps = []
    while sched.waiting:
        plan = sched.schedule()
        steps.append([(c.seq.request_id, c.start, c.stop) for c in plan.prefill])
        done = sched.prefilled(plan.prefill)
        sched.finish(done)
    assert steps == [[("long", 0, 10)], [("long", 10, 20)], [("long", 20, 23), ("short", 0, 3)]]
    assert blocks.num_free == blocks.num_total


def test_prompts_wait_for_blocks_in_arrival_order() -> None:
    blocks = BlockManager(5, 4)
    sched = Scheduler(blocks, 8, 100, decodes=False)
    big, small = bare_sequence("big", list(range(24))), bare_sequence("small", [1])
    sched.add(big)
    sched.add(small)
    assert sched.schedule().empty, "big needs 6 blocks of 5; small must not overtake it"
    assert blocks.num_free == 5


def test_decode_grows_and_preempts_the_newest() -> None:
    blocks = BlockManager(4, 2)
    sched = Scheduler(blocks, 8, 100)
    old, new = bare_sequence("old", [1, 2, 3], 20), bare_sequence("new", [4, 5, 6], 20)
    for seq in (old, new):
        seq.block_table = blocks.allocate(2)
        seq.append(9)
        sched.add_running(seq)
    plan = sched.schedule()
    assert [s.request_id for s in plan.decode] == ["old", "new"] and not plan.preempted
    for seq in (old, new):
        seq.append(9)  # 5 tokens: a third block each, but only... none left
    plan = sched.schedule()
    assert [s.request_id for s in plan.preempted] == ["new"]
    assert [s.request_id for s in plan.decode] == ["old"] and len(old.block_table) == 3
    assert new.block_table == [] and blocks.num_free == 1


def test_removed_sequences_give_their_blocks_back() -> None:
    blocks = BlockManager(16, 4)
    sched = Scheduler(blocks, 8, 4)
    seq = bare_sequence("a", list(range(10)))
    sched.add(seq)
    plan = sched.schedule()
    assert plan.prefill and blocks.num_free < 16
    assert sched.remove("a") is seq and blocks.num_free == 16 and len(sched) == 0


# -- the engine: batched, chunked and cached prefill against transformers ----------------

PROMPTS = [list(range(300, 337)), [5, 77, 300, 12, 9, 401], list(range(100, 229))]


def _run(engine: NativeEngine, sched: Scheduler, seqs: list[Sequence]) -> None:
    for seq in seqs:
        sched.add(seq)
    while len(sched):
        plan = sched.schedule()
        if plan.prefill:
            engine.prefill_step(plan.prefill)
            sched.prefilled(plan.prefill)
        else:
            engine.decode(plan.decode)
        sched.finish([s for s in (*sched.running, *sched.waiting) if s.finished])


@pytest.mark.parametrize("budget", [7, 16, 1000])
def test_batched_chunked_prefill_gives_transformers_tokens(tiny_llama: Path, budget: int) -> None:
    engine = NativeEngine(tiny_llama, "vllm-flash", 16, "float32", 64, "cpu")
    sched = Scheduler(engine.blocks, 8, budget)
    seqs = [engine.new_sequence(request(f"r{i}", p, 10)) for i, p in enumerate(PROMPTS)]
    _run(engine, sched, seqs)
    for prompt, seq in zip(PROMPTS, seqs, strict=True):
        assert seq.output_ids == hf_greedy(tiny_llama, prompt, 10)
    assert engine.blocks.num_free == engine.blocks.num_total


def test_a_cached_prefix_is_reused_and_gives_the_same_tokens(tiny_llama: Path) -> None:
    engine = NativeEngine(tiny_llama, "vllm-flash", 16, "float32", 64, "cpu", prefix_caching=True)
    sched = Scheduler(engine.blocks, 8, 1000)
    prompt = PROMPTS[2]
    first = engine.new_sequence(request("first", prompt, 6))
    _run(engine, sched, [first])
    second = engine.new_sequence(request("second", prompt[:120] + [7, 8, 9], 6))
    _run(engine, sched, [second])
    assert first.num_cached == 0 and second.num_cached == 112  # 7 full blocks of 16
    assert second.output_ids == hf_greedy(tiny_llama, prompt[:120] + [7, 8, 9], 6)
    assert first.output_ids == hf_greedy(tiny_llama, prompt, 6)
    assert engine.blocks.num_free == engine.blocks.num_total


def test_engine_and_gateway_stop_on_the_same_string(tiny_llama: Path) -> None:
    """One stop-string algorithm: the engine's checker and the gateway's matcher agree."""
    from services.hf.text_stream import IncrementalDetokenizer, StopStringMatcher
    from services.hf.tokenizer import Tokenizer

    tok = Tokenizer.from_model_dir(tiny_llama)
    prompt = tok.encode("Once upon a time")
    generated = hf_greedy(tiny_llama, prompt, 40)
    text = tok.decode(generated)
    for stop in {text[3:6], text[10:14], text[20:21]}:
        params = SamplingParams(max_tokens=40, stop=[stop], ignore_eos=True)
        checker = StopChecker(params, [], tok, prompt_ids=prompt)
        engine_stop = next(
            i for i, t in enumerate(generated) if checker.check(t, i + 1)[0] is not None
        )
        matcher, detok = StopStringMatcher([stop]), IncrementalDetokenizer(tok, prompt)
        gateway_stop = next(
            i for i, t in enumerate(generated) if matcher.feed(detok.feed([t])).stop is not None
        )
        assert engine_stop == gateway_stop
