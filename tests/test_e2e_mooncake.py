"""The `mooncake` KV transport end to end: real nats-server, real services, the real Mooncake
Transfer Engine (tcp, P2P handshake), tiny-llama in float32.

Headers travel over NATS, payloads are written by the engine into the receiver's staging
memory; the tokens must equal Hugging Face transformers' greedy output on the direct route
and through the converter (another layout, another TP degree), a write that fails mid-stream
ends with a clean error and no blocks held, and a bad header is refused with its reason.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import msgpack
import nats
import openai
import pytest

from proto.frames import Frame, encode_frame
from services.bench.oracle import hf_greedy
from tests.system import RunningSystem, run_system

pytestmark = pytest.mark.slow

try:
    import mooncake.engine  # noqa: F401
except ImportError as exc:  # pragma: no cover - the only reason to skip
    pytest.skip(f"the mooncake package cannot be imported: {exc}", allow_module_level=True)

FLASH = {"kv_layout": "vllm-flash", "block_size": 16, "num_blocks": 64}


@pytest.fixture(scope="module")
def system(nats_server, tiny_llama: Path, tmp_path_factory) -> Iterator[RunningSystem]:  # noqa: ANN001
    topology = {
        "model": str(tiny_llama),
        "kv_transport": "mooncake",
        "prefill": [
            {"name": "p", **FLASH},
            {"name": "pt", **FLASH, "tp": 2},
            # fault injection: its second payload is written outside the receiver's memory
            {"name": "pf", **FLASH, "env": {"HETSERVE_MOONCAKE_FAIL_WRITE_AFTER": "1"}},
        ],
        "decode": [
            {"name": "d", **FLASH},
            {
                "name": "dt",
                "kv_layout": "vllm-flash-hnd",
                "block_size": 32,
                "num_blocks": 64,
                "tp": 2,
            },
        ],
        "converter": {"replicas": 1},
    }
    with run_system(
        topology, nats_server.url, tmp_path_factory.mktemp("mooncake"), timeout_s=300
    ) as running:
        yield running


async def _complete(system: RunningSystem, prefill: str, decode: str, prompt: list[int]):  # noqa: ANN202
    client = openai.AsyncOpenAI(base_url=system.base_url, api_key="unused", max_retries=0)
    return await client.completions.create(
        model="tiny-llama",
        prompt=prompt,
        max_tokens=12,
        temperature=0,
        extra_body={
            "return_token_ids": True,
            "ignore_eos": True,
            "hetserve_route": {"prefill_instance": prefill, "decode_instance": decode},
        },
    )


def _prompt(seed: str, length: int = 150) -> list[int]:
    return [random.Random(seed).randrange(5, 1000) for _ in range(length)]


@pytest.mark.parametrize(
    ("prefill", "decode"),
    [("p-0", "d-0"), ("p-0", "dt-0"), ("pt-0", "d-0")],
    ids=["direct", "converter-tp1-to-tp2-hnd", "converter-tp2-to-tp1"],
)
async def test_tokens_equal_transformers(system: RunningSystem, prefill: str, decode: str) -> None:
    prompt = _prompt(prefill + decode)
    reply = await _complete(system, prefill, decode, prompt)
    assert reply.choices[0].model_extra["token_ids"] == hf_greedy(system.model_dir, prompt, 12)
    stats = await system.stats(decode)
    assert stats.free_blocks == stats.total_blocks
    host, port = stats.kv_endpoint.rsplit(":", 1)  # announced in the registry
    assert host and int(port) > 0


async def test_failed_write_ends_cleanly(system: RunningSystem) -> None:
    with pytest.raises(openai.APIError):
        await _complete(system, "pf-0", "d-0", _prompt("fail"))
    for _ in range(50):  # the prefill's log line may trail the gateway's answer
        if "transfer-engine write" in system.log_text():
            break
        await asyncio.sleep(0.1)
    assert "transfer-engine write" in system.log_text()
    assert "rejected a KV frame" not in system.log_text()  # the error end was taken as one
    stats = await system.stats("d-0")
    assert stats.free_blocks == stats.total_blocks
    # the system goes on: the next request over the same decode succeeds
    prompt = _prompt("after")
    reply = await _complete(system, "p-0", "d-0", prompt)
    assert reply.choices[0].model_extra["token_ids"] == hf_greedy(system.model_dir, prompt, 12)


async def test_bad_header_is_rejected_with_its_reason(system: RunningSystem) -> None:
    frame = Frame(
        kind="data",
        request_id="nobody",
        seq=1,
        shard=0,
        layout_id="x",
        layer=0,
        token_start=0,
        token_stop=16,
        payload=b"\0" * 64,
    )
    nc = await nats.connect(system.nats_url)
    try:
        msg = await nc.request(
            system.subjects.kv_frames("d-0", 0), encode_frame(frame, at=3), timeout=5
        )
    finally:
        await nc.close()
    ack = msgpack.unpackb(msg.data)
    assert ack["ok"] is False and "not leased to this stream" in ack["reason"]
    assert "rejected a KV frame of nobody" in system.log_text()
