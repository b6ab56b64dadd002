"""The scheduler's choice of (prefill, decode, route), as pure functions over registry entries:
cached prefixes, measured speeds, queues, route costs and local prefill."""

from __future__ import annotations

import random

import pytest

from proto.kv_descriptor import KVDescriptor
from proto.messages import GenerateRequest, InstanceInfo, SamplingParams
from proto.prefix_hash import block_hashes, pack_hashes
from services.scheduler.costs import Defaults, PrefixIndex
from services.scheduler.policy import RoutingError, options, unroutable_reason

PROMPT = list(range(1000, 1600))  # 600 tokens


def kv(layout: str = "vllm-flash", block: int = 16) -> KVDescriptor:
    return KVDescriptor(
        layout=layout, block_size=block, dtype="float32", num_layers=4, num_kv_heads=2, head_dim=32
    )


def instance(name: str, role: str, **fields: object) -> InstanceInfo:
    defaults = {"kv": kv(), "free_blocks": 100, "total_blocks": 100, "heartbeat_at": 1.0}
    return InstanceInfo(instance_id=name, role=role, **{**defaults, **fields})


def holding(tokens: list[int], block: int = 16) -> bytes:
    return pack_hashes(block_hashes(tokens, block))


def request(prompt: list[int] = PROMPT, max_tokens: int = 32, **fields: object) -> GenerateRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return GenerateRequest(request_id="r", prompt_token_ids=prompt, sampling=params, **fields)


def best(req: GenerateRequest, prefills: list, decodes: list, routing: str = "kv_aware"):
    found = options(req, prefills, decodes, True, routing, PrefixIndex(), Defaults())
    return found[0]


@pytest.fixture(autouse=True)
def seeded() -> None:
    random.seed(7)


def test_the_prefill_holding_the_prefix_wins() -> None:
    cold = instance("p-cold", "prefill")
    warm = instance("p-warm", "prefill", cached_prefixes=holding(PROMPT[:512]))
    choice = best(request(), [cold, warm], [instance("d", "decode")])
    assert choice.prefill.instance_id == "p-warm"
    assert choice.estimate.cached_prefill == 512


def test_the_decode_holding_the_conversation_moves_less() -> None:
    turn = PROMPT[:400]
    decodes = [
        instance("d-cold", "decode"),
        instance("d-warm", "decode", cached_prefixes=holding(turn)),
    ]
    choice = best(request(), [instance("p", "prefill")], decodes)
    assert choice.decode.instance_id == "d-warm" and choice.estimate.cached_decode == 400


def test_a_cached_prefix_is_aligned_to_both_block_sizes() -> None:
    decode = instance(
        "d", "decode", kv=kv("ascend", 128), cached_prefixes=holding(PROMPT[:400], 128)
    )
    choice = best(request(), [instance("p", "prefill")], [decode])
    assert choice.via_converter and choice.token_align == 128
    assert choice.estimate.cached_decode == 384  # 3 of the 128-token blocks


def test_a_measured_fast_prefill_beats_a_slow_one_with_the_same_queue() -> None:
    slow = instance("p-slow", "prefill", prefill_tokens_per_s=500.0)
    fast = instance("p-fast", "prefill", prefill_tokens_per_s=5000.0)
    assert best(request(), [slow, fast], [instance("d", "decode")]).prefill.instance_id == "p-fast"


def test_a_queue_outweighs_speed_when_it_is_long_enough() -> None:
    busy = instance("p-fast", "prefill", prefill_tokens_per_s=5000.0, queued_tokens=50_000)
    idle = instance("p-slow", "prefill", prefill_tokens_per_s=1000.0)
    assert best(request(), [busy, idle], [instance("d", "decode")]).prefill.instance_id == "p-slow"


def test_a_slow_decode_loses_to_a_fast_one() -> None:
    slow = instance("d-slow", "decode", decode_step_s=0.2)
    fast = instance("d-fast", "decode", decode_step_s=0.01)
    assert best(request(), [instance("p", "prefill")], [slow, fast]).decode.instance_id == "d-fast"


def test_a_direct_route_beats_the_converter_for_equal_instances() -> None:
    converted = instance("d-ascend", "decode", kv=kv("ascend", 128))
    direct = instance("d-flash", "decode")
    choice = best(request(), [instance("p", "prefill")], [converted, direct])
    assert choice.decode.instance_id == "d-flash" and not choice.via_converter


def test_short_prompts_are_prefilled_where_they_decode_when_it_is_allowed() -> None:
    decode = instance("d", "decode", local_prefill_max_tokens=64)
    short = best(request(PROMPT[:20]), [instance("p", "prefill")], [decode])
    assert short.local and short.prefill is None
    long = best(request(), [instance("p", "prefill")], [decode])
    assert not long.local, "600 uncached tokens are above the decode's limit"


def test_aggregated_instances_serve_without_a_prefill_instance() -> None:
    both = instance("both-0", "decode", local_prefill_max_tokens=1 << 30)
    assert best(request(), [], [both]).local
    assert (
        options(
            request(), [], [instance("d", "decode")], True, "kv_aware", PrefixIndex(), Defaults()
        )
        == []
    )
    assert "prefill" in unroutable_reason(request(), [], [instance("d", "decode")], True)


def test_the_load_policy_is_the_old_order() -> None:
    roomy = instance("d-roomy", "decode", free_blocks=90, decode_step_s=0.5)
    tight = instance("d-tight", "decode", free_blocks=10, decode_step_s=0.01)
    choice = best(request(), [instance("p", "prefill")], [roomy, tight], routing="load")
    assert choice.decode.instance_id == "d-roomy", "most free blocks, whatever the speed"


def test_pins_and_exclusions_hold() -> None:
    prefills = [instance("p1", "prefill"), instance("p2", "prefill")]
    decodes = [instance("d1", "decode"), instance("d2", "decode")]
    pinned = request(pin_prefill="p2", pin_decode="d1")
    choice = best(pinned, prefills, decodes)
    assert (choice.prefill.instance_id, choice.decode.instance_id) == ("p2", "d1")
    excluded = request(excluded_instances=["p1", "d2"])
    found = options(excluded, prefills, decodes, True, "kv_aware", PrefixIndex(), Defaults())
    assert {(o.prefill.instance_id, o.decode.instance_id) for o in found} == {("p2", "d1")}
    with pytest.raises(RoutingError, match="not live"):
        options(
            request(pin_decode="gone"),
            prefills,
            decodes,
            True,
            "kv_aware",
            PrefixIndex(),
            Defaults(),
        )


def test_an_idle_decode_beats_a_busy_one_of_the_same_speed() -> None:
    busy = instance("d-busy", "decode", running=6, decode_step_s=0.006)
    idle = instance("d-idle", "decode", decode_step_s=0.006)  # measured when it was as busy
    for _ in range(10):  # ties are shuffled: this is no tie
        assert best(request(), [instance("p", "prefill")], [busy, idle]).decode.instance_id == (
            "d-idle"
        )


def test_an_unmeasured_decode_is_as_fast_as_its_measured_peers() -> None:
    # A fixed default step (20 ms) against a measured 4 ms would send the new instance nothing.
    measured = instance("d-measured", "decode", running=2, decode_step_s=0.004)
    new = instance("d-new", "decode")
    choice = best(request(), [instance("p", "prefill")], [measured, new])
    assert choice.decode.instance_id == "d-new"
    assert choice.estimate.tpot_s < 0.004


def test_placements_since_the_last_heartbeat_count_as_load() -> None:
    """Requests between two heartbeats see one snapshot; what the scheduler placed itself
    spreads them over equal instances."""
    from services.scheduler.placements import RecentPlacements

    recent = RecentPlacements()
    prefills = [instance("p1", "prefill"), instance("p2", "prefill")]
    decodes = [instance("d1", "decode"), instance("d2", "decode")]
    used = []
    for _ in range(4):
        choice = best(
            request(), [recent.applied(p) for p in prefills], [recent.applied(d) for d in decodes]
        )
        recent.placed(choice.decode, sequences=1)
        recent.placed(choice.prefill, tokens=len(PROMPT))
        used.append((choice.prefill.instance_id, choice.decode.instance_id))
    assert sorted(d for _, d in used) == ["d1", "d1", "d2", "d2"]
    assert sorted(p for p, _ in used) == ["p1", "p1", "p2", "p2"]
    # the next heartbeat reports the load itself: the placements stop counting
    fresh = decodes[0].model_copy(update={"heartbeat_at": 2.0})
    assert recent.applied(fresh).waiting == 0
