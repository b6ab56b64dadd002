"""Fuzz the OpenAI API with hypothesis: 10,000 generated bodies across /v1/completions and
/v1/chat/completions, sent over real HTTP to the gateway's aiohttp app (the demo model's real
tokenizer and chat template; a backend that packs every request as the wire does) in a
thread of its own. Every field of OpenAI's schema and vLLM's extensions, with plausible values
and junk of every JSON type, huge numbers, odd unicode (lone surrogates included), truncated
JSON, raw bytes, deep nesting, bodies over the size limit.

Never a 5xx, never a dropped connection, every 4xx is an OpenAI error body, every 200 a whole
completion (or an SSE stream ending in [DONE]), 413 exactly when the body is over the limit,
and the service healthy afterwards.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.messages import GenerateRequest, TokenEvent
from services.common.settings import GatewaySettings
from services.gateway.http_app import create_app
from services.hf.tokenizer import Tokenizer
from tests.test_gateway_http import ScriptedBackend

EXAMPLES_PER_ENDPOINT = 5000
BODY_LIMIT = 16 * 1024
MODEL = "tiny-llama"
MAX_MODEL_LEN = 64
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class WireBackend(ScriptedBackend):
    """The scripted backend behind a real wire: each request is packed and unpacked as the
    gateway's NATS dispatch packs it, so what the HTTP layer lets through must fit the wire."""

    model_name = MODEL
    max_model_len = MAX_MODEL_LEN

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        request = GenerateRequest.unpack(request.pack())
        async for event in super().generate(request):
            yield event


@contextmanager
def served_in_thread(app: web.Application) -> Iterator[int]:
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


# --- strategies ------------------------------------------------------------------------------

ODD_CHARS = st.characters(exclude_categories=())  # every code point, lone surrogates too
ODD_TEXT = st.text(ODD_CHARS, max_size=30) | st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\ufeff",
        "\u202e\u2066",
        "\u2028",
        "e\u0301\u0301",
        "🧪👩‍🔬",
        "\ud800",
        "\udfff",
    ]
)
HUGE_INTS = st.sampled_from([2**31, 2**53 + 1, 2**63, -(2**63) - 1, 2**64, 10**30, -(10**30)])
INTS = st.integers(-3, 300) | HUGE_INTS | st.integers(-(2**70), 2**70)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, 2.0])
SCALARS = st.none() | st.booleans() | INTS | FLOATS | ODD_TEXT
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4),
    max_leaves=5,
)


def field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    return plausible | plausible | JUNK


TOKEN_IDS = st.lists(st.integers(0, 600) | st.integers(-2, 2**40), max_size=40)
STOP = st.none() | ODD_TEXT | st.lists(ODD_TEXT, max_size=4)
COMMON: dict[str, st.SearchStrategy] = {
    "model": field(st.just(MODEL) | st.none()),
    "max_tokens": field(st.none() | st.integers(-1, 120) | HUGE_INTS),
    "temperature": field(st.none() | st.floats(-1, 3) | FLOATS),
    "top_p": field(st.none() | st.floats(-0.5, 1.5)),
    "top_k": field(st.none() | st.integers(-3, 50) | HUGE_INTS),
    "seed": field(st.none() | INTS),
    "stop": field(STOP),
    "stop_token_ids": field(st.none() | TOKEN_IDS),
    "ignore_eos": field(st.none() | st.booleans()),
    "stream": field(st.none() | st.booleans()),
    "stream_options": field(
        st.none() | st.fixed_dictionaries({}, optional={"include_usage": JUNK})
    ),
    "return_token_ids": field(st.none() | st.booleans()),
    "hetserve_route": field(
        st.none()
        | st.fixed_dictionaries(
            {}, optional={"prefill_instance": ODD_TEXT, "decode_instance": ODD_TEXT}
        )
    ),
    "n": field(st.none() | st.integers(0, 3)),
    "frequency_penalty": field(st.none() | st.floats(-2, 2)),
    "presence_penalty": field(st.none() | st.floats(-2, 2)),
    "logit_bias": field(st.none() | st.dictionaries(st.integers(0, 600).map(str), INTS)),
    "user": field(ODD_TEXT),
    "min_p": field(st.none() | st.floats(0, 1)),
    "repetition_penalty": field(st.none() | st.floats(0.5, 2)),
    "min_tokens": field(st.none() | st.integers(0, 5)),
    "skip_special_tokens": field(st.none() | st.booleans()),
    "guided_json": field(st.none() | st.just({"type": "object"})),
}
COMPLETION_FIELDS = {
    **COMMON,
    "prompt": field(
        ODD_TEXT
        | st.text(max_size=300)
        | TOKEN_IDS
        | st.lists(ODD_TEXT, max_size=3)
        | st.lists(TOKEN_IDS, max_size=2)
    ),
    "best_of": field(st.none() | st.integers(0, 3)),
    "echo": field(st.none() | st.booleans()),
    "logprobs": field(st.none() | st.integers(0, 5)),
    "suffix": field(st.none() | ODD_TEXT),
}
CONTENT = ODD_TEXT | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]), "text": JUNK})
    | st.fixed_dictionaries({"type": st.just("text"), "text": ODD_TEXT}),
    max_size=3,
)
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": field(
            st.sampled_from(["system", "user", "assistant", "developer", "tool", "function"])
        ),
        "content": field(CONTENT | st.none()),
        "name": field(ODD_TEXT),
        "tool_calls": JUNK,
    },
)
USER_TURNS = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": ODD_TEXT}),
    min_size=1,
    max_size=4,
)
CHAT_FIELDS = {
    **COMMON,
    "messages": field(USER_TURNS | st.lists(MESSAGE, max_size=4)),
    "max_completion_tokens": field(st.none() | st.integers(-1, 120) | HUGE_INTS),
    "logprobs": field(st.none() | st.booleans()),
    "top_logprobs": field(st.none() | st.integers(0, 5)),
    "tools": field(st.none() | st.just([]) | st.just([{"type": "function"}])),
    "tool_choice": field(st.none() | st.sampled_from(["none", "auto", "required"])),
    "functions": field(st.none() | st.just([{"name": "f"}])),
    "response_format": field(
        st.none() | st.sampled_from([{"type": "text"}, {"type": "json_object"}])
    ),
    "parallel_tool_calls": field(st.booleans()),
    "modalities": field(st.just(["text"]) | st.just(["text", "audio"])),
    "audio": field(st.none() | st.just({"voice": "alloy", "format": "wav"})),
    "reasoning_effort": field(st.none() | st.sampled_from(["low", "medium", "high"])),
    "store": field(st.none() | st.booleans()),
    "metadata": field(st.dictionaries(ODD_TEXT, ODD_TEXT, max_size=2)),
    "service_tier": field(st.sampled_from(["auto", "default", "flex"])),
    "prediction": JUNK,
    "web_search_options": field(st.none() | st.just({})),
    "add_generation_prompt": field(st.booleans()),
    "chat_template_kwargs": field(st.just({})),
}


@st.composite
def _object(draw: st.DrawFn, fields: dict[str, st.SearchStrategy], required: str) -> dict:
    """A few fields at a time (drawing all of them every time would be slow), the required
    one mostly there, sometimes keys of no schema at all."""
    names = draw(st.lists(st.sampled_from(sorted(fields)), max_size=6, unique=True))
    body = {name: draw(fields[name]) for name in names}
    if draw(st.integers(0, 9)) < 8:
        body[required] = draw(fields[required])
    if draw(st.integers(0, 9)) == 0:
        body.update(draw(st.dictionaries(ODD_TEXT, JUNK, max_size=2)))
    return body


def _encoded(body: Any, ascii_only: bool, indent: int | None) -> bytes:
    # Lone surrogates: escaped as \udXXX in ASCII JSON, bytes that are not UTF-8 otherwise.
    text = json.dumps(body, ensure_ascii=ascii_only, indent=indent)
    return text.encode("utf-8", "surrogatepass")


RAW = st.sampled_from(
    [
        b"",
        b"{",
        b"null",
        b"[]",
        b'"text"',
        b"\xff\xfe\x00{",
        b'{"prompt": "a", "max_tokens": 1e400}',
        b'{"prompt": [1, 2], "max_tokens": ' + b"9" * 5000 + b"}",
        b"[" * 8000 + b"]" * 8000,  # nested past the parser's recursion limit, under the size limit
        b'{"messages": ' + b"[" * 10_000,
        b'{"prompt": "a", "prompt": 5}',
        b'{"prompt": "a"}' + b" " * (BODY_LIMIT + 1),
        b'{"prompt": "a", "max_tokens": NaN}',
        b'{"prompt": "a", "temperature": Infinity}',
    ]
)


@st.composite
def bodies(draw: st.DrawFn, endpoint: str) -> bytes:
    fields, required = (
        (COMPLETION_FIELDS, "prompt") if endpoint == "completions" else (CHAT_FIELDS, "messages")
    )
    body = draw(_object(fields, required) | st.one_of(JUNK, st.just({})) | st.none())
    raw = _encoded(body, draw(st.booleans()), draw(st.sampled_from([None, 1])))
    mutation = draw(st.sampled_from(["as-is"] * 6 + ["truncated", "padded", "bytes", "raw"]))
    if mutation == "truncated" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if mutation == "padded":  # around the body size limit
        pad = b" " * draw(st.sampled_from([BODY_LIMIT - len(raw) - 1, BODY_LIMIT + 1, 40_000]))
        return raw + pad
    if mutation == "bytes":
        return draw(st.binary(max_size=200))
    if mutation == "raw":
        return draw(RAW)
    return raw


# --- checks ----------------------------------------------------------------------------------


def check_error_body(status: int, data: bytes) -> None:
    body = json.loads(data)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == "invalid_request_error", error
    assert error["param"] is None or isinstance(error["param"], str), error


def check_completion(data: bytes, streamed: bool) -> None:
    if not streamed:
        body = json.loads(data)
        (choice,) = body["choices"]
        assert choice["finish_reason"] in ("stop", "length"), body
        assert body["usage"]["completion_tokens"] >= 1
        return
    events = [block.removeprefix(b"data: ") for block in data.strip().split(b"\n\n")]
    assert events[-1] == b"[DONE]", data[-200:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length"), chunks


class Client:
    """One keep-alive connection, reopened only when the server says it closes it."""

    def __init__(self, port: int):
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.sent = 0

    def post(self, path: str, body: bytes) -> tuple[int, bytes, str]:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        self.connection.request("POST", path, body=body, headers=headers)
        response = self.connection.getresponse()
        data = response.read()  # a dropped connection raises here, failing the example
        self.sent += 1
        return response.status, data, response.getheader("Content-Type", "")

    def get(self, path: str) -> int:
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        response.read()
        return response.status

    def close(self) -> None:
        self.connection.close()


@pytest.fixture(scope="module")
def fuzzed_port(tiny_llama: Path) -> Iterator[int]:
    tokenizer = Tokenizer.from_model_dir(tiny_llama)
    backend = WireBackend(tokenizer, "hello there, fuzz")
    backend.tokens_per_event = 8
    app = create_app(backend, tokenizer, GatewaySettings(max_request_body_bytes=BODY_LIMIT))
    with served_in_thread(app) as port:
        yield port


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_fuzzed_bodies_get_an_answer_never_a_5xx(fuzzed_port: int, endpoint: str) -> None:
    client = Client(fuzzed_port)
    path = PATHS[endpoint]
    statuses: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES_PER_ENDPOINT,
        deadline=None,
        database=None,
        derandomize=True,  # the same 5,000 cases every run: a failure reproduces
        suppress_health_check=list(HealthCheck),
    )
    @given(body=bodies(endpoint))
    def send(body: bytes) -> None:
        status, data, content_type = client.post(path, body)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (status, body[:300], data[:300])
        if status >= 400:
            check_error_body(status, data)
        else:
            assert status == 200
            check_completion(data, content_type.startswith("text/event-stream"))
        assert (status == 413) == (len(body) > BODY_LIMIT), (status, len(body))

    try:
        send()
        assert client.sent >= EXAMPLES_PER_ENDPOINT
        # Every kind of answer was exercised, not only refusals.
        assert statuses.get(200, 0) > EXAMPLES_PER_ENDPOINT // 50, statuses
        assert statuses.get(400, 0) > EXAMPLES_PER_ENDPOINT // 4, statuses
        assert statuses.get(413, 0) > 0, statuses
        # Healthy afterwards, and serving.
        assert client.get("/health") == 200
        ok = {"prompt": "hi", "max_tokens": 3} if endpoint == "completions" else None
        ok = ok or {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        status, data, _ = client.post(path, json.dumps(ok).encode())
        assert status == 200, data
    finally:
        client.close()
