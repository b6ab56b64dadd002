"""Fuzz every bus message type as the service that receives it gets it (KV frames have
tests/test_bad_frames.py): hypothesis draws raw bytes, msgpack of any shape, valid messages
cut short, with a field of the wrong type, without a required field or with an unknown one.
Only what the wire contract refuses is sent. Each is rejected with a reason (a request-reply
answers it), counted once in the receiver's hetserve_errors_total, and disturbs nothing:
afterwards the system serves transformers' tokens with every block free.

Receivers: the scheduler (requests on the JetStream queue), the prefill (jobs), the decode
(reservations, aborts), every service's registry (heartbeat entries), the gateway (the events
of a request it is streaming)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import msgpack
import nats
import openai
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proto.kv_descriptor import KVDescriptor
from proto.messages import (
    AbortRequest,
    GenerateRequest,
    InstanceInfo,
    KVRoute,
    Message,
    MessageError,
    PrefillJob,
    ReserveReply,
    ReserveRequest,
    SamplingParams,
    TokenEvent,
    unpack_request_event,
)
from services.bench.oracle import hf_greedy
from tests.system import RunningSystem, run_system

pytestmark = pytest.mark.slow

EXAMPLES = 150  # per receiver
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TOPOLOGY = {
    "prefill": [{"name": "p", "kv_layout": "vllm-flash", "block_size": 16}],
    "decode": [{"name": "d", "kv_layout": "vllm-cpu", "block_size": 32}],
    "converter": {"replicas": 1},
}


# --- what is sent ------------------------------------------------------------------------------

_REQUEST = GenerateRequest(
    request_id="fuzz-1", prompt_token_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=4)
)
_KV = KVDescriptor(
    layout="vllm-cpu", block_size=32, dtype="float32", num_layers=4, num_kv_heads=2, head_dim=32
)
VALID: dict[type[Message], Message] = {
    GenerateRequest: _REQUEST,
    PrefillJob: PrefillJob(
        request=_REQUEST,
        route=KVRoute(send_to="d-0", decode_instance="d-0", decode_kv=_KV),
        events_subject="fuzz.events",
    ),
    ReserveRequest: ReserveRequest(request=_REQUEST, num_tokens=8, hold_seconds=1.0),
    AbortRequest: AbortRequest(request_id="fuzz-1"),
    InstanceInfo: InstanceInfo(instance_id="fuzz-0", role="decode"),
    TokenEvent: TokenEvent(request_id="fuzz-1", index=0, token_ids=[1]),
}

ANY_VALUE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=12,
)


def _packed(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def junk(kind: type[Message]) -> st.SearchStrategy[bytes]:
    valid = VALID[kind]
    raw = valid.model_dump(mode="python")
    whole = valid.pack()
    keys = sorted(raw)
    return st.one_of(
        st.binary(max_size=300),
        ANY_VALUE.map(_packed),
        st.integers(0, len(whole) - 1).map(lambda cut: whole[:cut]),
        st.tuples(st.sampled_from(keys), ANY_VALUE).map(lambda kv: _packed({**raw, kv[0]: kv[1]})),
        st.sampled_from(keys).map(lambda key: _packed({k: v for k, v in raw.items() if k != key})),
        ANY_VALUE.map(lambda extra: _packed({**raw, "unexpected": extra})),
    )


def refused(kind: type[Message], data: bytes) -> bool:
    """Whether the wire contract refuses `data` as a `kind` (else it would be served)."""
    try:
        if kind is TokenEvent:
            unpack_request_event(data)
        else:
            kind.unpack(data)
    except MessageError:
        return True
    return False


# --- a NATS client on a loop of its own, for hypothesis's synchronous examples ------------------


class BusThread:
    def __init__(self, url: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nc: nats.NATS = self.run(nats.connect(url.split(",")))

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.run(self.nc.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def fuzzed(nats_server, tiny_llama: Path, tmp_path_factory) -> Iterator[tuple]:  # noqa: ANN001
    topology = {"model": str(tiny_llama), **TOPOLOGY}
    with run_system(topology, nats_server.url, tmp_path_factory.mktemp("bus-fuzz")) as system:
        bus = BusThread(system.nats_url)
        try:
            yield system, bus
        finally:
            bus.close()


def errors(bus: BusThread, system: RunningSystem, instance: str, key: str) -> int:
    async def ask() -> int:
        msg = await bus.nc.request(system.subjects.stats(instance), b"", timeout=5)
        return InstanceInfo.unpack(msg.data).errors.get(key, 0)

    return bus.run(ask())


def counted(
    bus: BusThread, system: RunningSystem, instance: str, key: str, before: int, sent: int
) -> int:
    """The receiver's count of `key` once it stops growing toward before + sent (10 s)."""
    deadline = time.monotonic() + 10
    now = errors(bus, system, instance, key)
    while now < before + sent and time.monotonic() < deadline:
        time.sleep(0.2)
        now = errors(bus, system, instance, key)
    return now - before


def fuzz(kind: type[Message], send: Callable[[bytes], None]) -> int:
    """Sends hypothesis's refused `kind`s with `send`; how many were sent."""
    sent = 0

    @FUZZ
    @given(junk(kind))
    def one(data: bytes) -> None:
        nonlocal sent
        assume(refused(kind, data))
        send(data)
        sent += 1

    one()
    assert sent > EXAMPLES // 2, sent
    return sent


# --- the receivers -----------------------------------------------------------------------------


def test_the_scheduler_refuses_malformed_requests(fuzzed: tuple) -> None:
    system, bus = fuzzed
    key = "scheduler/malformed_request"
    before = errors(bus, system, "scheduler-0", key)
    js = bus.nc.jetstream()
    sent = fuzz(GenerateRequest, lambda data: bus.run(js.publish(system.subjects.requests, data)))
    assert counted(bus, system, "scheduler-0", key, before, sent) == sent


def test_the_prefill_refuses_malformed_jobs_with_a_reason(fuzzed: tuple) -> None:
    system, bus = fuzzed
    key = "prefill/malformed_job"
    before = errors(bus, system, "p-0", key)

    def send(data: bytes) -> None:
        reply = bus.run(bus.nc.request(system.subjects.prefill_jobs("p-0"), data, timeout=5))
        assert reply.data.startswith(b"rejected: PrefillJob"), reply.data

    sent = fuzz(PrefillJob, send)
    assert counted(bus, system, "p-0", key, before, sent) == sent


def test_the_decode_refuses_malformed_reservations_with_a_reason(fuzzed: tuple) -> None:
    system, bus = fuzzed
    key = "decode/malformed_reserve"
    before = errors(bus, system, "d-0", key)

    def send(data: bytes) -> None:
        msg = bus.run(bus.nc.request(system.subjects.reserve("d-0"), data, timeout=5))
        reply = ReserveReply.unpack(msg.data)
        assert not reply.ok and reply.reason.startswith("ReserveRequest"), reply

    sent = fuzz(ReserveRequest, send)
    assert counted(bus, system, "d-0", key, before, sent) == sent


def test_the_decode_ignores_malformed_aborts(fuzzed: tuple) -> None:
    system, bus = fuzzed
    key = "decode/malformed_abort"
    before = errors(bus, system, "d-0", key)
    sent = fuzz(AbortRequest, lambda data: bus.run(bus.nc.publish(system.subjects.aborts, data)))
    assert counted(bus, system, "d-0", key, before, sent) == sent


def test_every_registry_ignores_malformed_entries(fuzzed: tuple) -> None:
    system, bus = fuzzed
    key = "registry/malformed_entry"
    before = {i: errors(bus, system, i, key) for i in ("d-0", "p-0", "scheduler-0")}
    kv = bus.run(bus.nc.jetstream().key_value(system.subjects.registry_bucket))
    names = iter(range(1 << 30))
    sent = fuzz(InstanceInfo, lambda data: bus.run(kv.put(f"fuzz-{next(names)}", data)))
    for instance, was in before.items():
        assert counted(bus, system, instance, key, was, sent) == sent, instance
    for n in range(sent):  # leave no junk for later watchers
        bus.run(kv.purge(f"fuzz-{n}"))


def test_the_gateway_ignores_malformed_events_of_a_request_it_streams(fuzzed: tuple) -> None:
    system, bus = fuzzed
    key = "gateway/malformed_event"
    before = errors(bus, system, "gateway-0", key)
    corpus: list[bytes] = []

    @FUZZ
    @given(junk(TokenEvent))
    def collect(data: bytes) -> None:
        assume(refused(TokenEvent, data))
        corpus.append(data)

    collect()
    routed: list[str] = []

    async def watch_routes() -> Any:
        async def on_event(msg) -> None:  # noqa: ANN001
            routed.append(msg.subject)

        return await bus.nc.subscribe(system.subjects.every_request_events, cb=on_event)

    watcher = bus.run(watch_routes())
    prompt = list(range(20, 60))

    async def stream() -> list[int]:
        client = openai.AsyncOpenAI(base_url=system.base_url, api_key="-", max_retries=0)
        tokens: list[int] = []
        chunks = await client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=200, temperature=0, stream=True,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )  # fmt: skip
        async for chunk in chunks:
            tokens.extend(chunk.choices[0].model_extra.get("token_ids") or [])
            if len(tokens) == 20:  # mid-stream: the junk lands among the real events
                for data in corpus:
                    await bus.nc.publish(routed[0], data)
        await client.close()
        return tokens

    tokens = bus.run(stream(), timeout_s=120)
    bus.run(watcher.unsubscribe())
    assert tokens == hf_greedy(system.model_dir, prompt, 200)
    assert counted(bus, system, "gateway-0", key, before, len(corpus)) == len(corpus)


def test_after_the_fuzz_the_system_serves_and_holds_no_blocks(fuzzed: tuple) -> None:
    system, bus = fuzzed
    prompt = list(range(100, 130))

    async def complete() -> list[int]:
        client = openai.AsyncOpenAI(base_url=system.base_url, api_key="-", max_retries=0)
        reply = await client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=16, temperature=0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )  # fmt: skip
        await client.close()
        return reply.choices[0].model_extra["token_ids"]

    assert bus.run(complete(), timeout_s=60) == hf_greedy(system.model_dir, prompt, 16)
    stats = bus.run(bus.nc.request(system.subjects.stats("d-0"), b"", timeout=5))
    decode = InstanceInfo.unpack(stats.data)
    assert decode.free_blocks == decode.total_blocks
