"""The gateway's HTTP layer under limits, over an in-test backend: API keys, admission (in-flight
and queue bounds, queue wait budget, per-key limit, no capacity), the body size limit,
unsupported fields, /metrics. (Against the whole system: tests/test_e2e_admission.py.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proto.messages import GenerateRequest, TokenEvent
from services.common.settings import GatewaySettings
from tests.test_gateway_http import CHAT, COMPLETIONS, MODEL, USER, ScriptedBackend, serve

KEYS = "sk-first-key,  sk-second-key"


class GatedBackend(ScriptedBackend):
    """Each request waits at the gate before its first token: it holds its slot until then."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.started = 0

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        self.started += 1
        await self.gate.wait()
        async for event in super().generate(request):
            yield event


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
async def base_url(backend: ScriptedBackend) -> AsyncIterator[str]:
    async with serve(backend) as url:
        yield url


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def limits(**overrides: Any) -> GatewaySettings:
    return GatewaySettings(**overrides)


def assert_error(body: Any, error_type: str, code: str | None) -> str:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (error_type, code)
    assert error["message"]
    return error["message"]


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, key: str | None = None
) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.post(url, json=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


COMPLETION = {"prompt": "a", "max_tokens": 2}


async def eventually(check: Any, timeout_s: float = 5) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():  # noqa: ASYNC110 - polls state the server changes
            await asyncio.sleep(0.01)


# --- API keys ------------------------------------------------------------------------------


@pytest.fixture
async def keyed_url() -> AsyncIterator[str]:
    async with serve(ScriptedBackend(), settings=limits(api_key=KEYS)) as url:
        yield url


@pytest.mark.parametrize("key", ["sk-first-key", "sk-second-key"])
async def test_a_configured_key_is_served(keyed_url: str, key: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{keyed_url}/v1", api_key=key, max_retries=0) as c:
        completion = await c.completions.create(model=MODEL, prompt="a", max_tokens=2)
        assert completion.choices[0].text == "He"
        assert [m.id async for m in c.models.list()] == [MODEL]


@pytest.mark.parametrize("key", ["sk-wrong", "sk-first-ke", "sk-first-key2", "sk-first-key,x"])
async def test_a_wrong_key_is_401(keyed_url: str, key: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{keyed_url}/v1", api_key=key, max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as raised:
            await c.chat.completions.create(model=MODEL, messages=USER)
    assert raised.value.status_code == 401
    body = raised.value.body
    assert isinstance(body, dict) and body["type"] == "authentication_error"
    assert key not in body["message"]


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer ", "Basic c2stZmlyc3Qta2V5", "sk-first-key"]
)
async def test_no_key_is_401(keyed_url: str, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    async with aiohttp.ClientSession() as http:
        for method, path in [("POST", COMPLETIONS), ("POST", CHAT), ("GET", "/v1/models")]:
            async with http.request(method, f"{keyed_url}{path}", headers=headers) as response:
                assert response.status == 401
                assert response.headers["WWW-Authenticate"] == "Bearer"
                assert_error(await response.json(), "authentication_error", "invalid_api_key")
        # An unknown path does not tell whether it exists before the key is checked.
        async with http.get(f"{keyed_url}/v1/nothing", headers=headers) as response:
            assert response.status == 401


async def test_probes_need_no_key(keyed_url: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{keyed_url}/health") as response:
            assert response.status == 200
        async with http.get(f"{keyed_url}/metrics") as response:
            assert response.status == 200


async def test_keys_are_never_logged(keyed_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as http:
        for key in ("sk-first-key", "sk-wrong-key"):
            await post(http, f"{keyed_url}{COMPLETIONS}", COMPLETION, key)
    assert caplog.records  # the access log did log the requests
    assert "sk-first-key" not in caplog.text and "sk-wrong-key" not in caplog.text
    assert "sk-" not in repr(limits(api_key=KEYS))


# --- admission -----------------------------------------------------------------------------


async def test_beyond_inflight_and_queue_is_429_then_queue_budget_is_503() -> None:
    backend = GatedBackend()
    settings = limits(max_inflight_requests=1, max_queued_requests=1, max_queue_wait_s=0.5)
    async with serve(backend, settings=settings) as url, aiohttp.ClientSession() as http:
        running = asyncio.create_task(post(http, f"{url}{COMPLETIONS}", COMPLETION))
        await eventually(lambda: backend.started == 1)
        queued = asyncio.create_task(post(http, f"{url}{COMPLETIONS}", COMPLETION))
        await asyncio.sleep(0.1)
        status, headers, body = await post(http, f"{url}{CHAT}", {"messages": USER})
        assert status == 429
        assert int(headers["Retry-After"]) >= 1
        assert "capacity" in assert_error(body, "rate_limit_error", "queue_full")
        status, headers, body = await asyncio.wait_for(queued, 5)
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert "0.5 s" in assert_error(body, "server_error", "queue_timeout")
        assert backend.started == 1  # neither reached the system
        backend.gate.set()
        status, _, body = await asyncio.wait_for(running, 5)
        assert status == 200 and body["choices"][0]["text"] == "He"
        # Everything is free again.
        status, _, _ = await post(http, f"{url}{COMPLETIONS}", COMPLETION)
        assert status == 200


async def test_queued_requests_start_in_arrival_order_when_slots_free() -> None:
    backend = GatedBackend()
    settings = limits(max_inflight_requests=2, max_queued_requests=8, max_queue_wait_s=30)
    async with serve(backend, settings=settings) as url, aiohttp.ClientSession() as http:
        tasks = []
        for i in range(6):
            body = {"prompt": "a", "max_tokens": 2, "seed": i}
            tasks.append(asyncio.create_task(post(http, f"{url}{COMPLETIONS}", body)))
            await asyncio.sleep(0.05)
        await eventually(lambda: backend.started == 2)
        await asyncio.sleep(0.2)
        assert backend.started == 2  # two in flight, four waiting
        backend.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert [status for status, _, _ in results] == [200] * 6
    assert [r.sampling.seed for r in backend.requests] == list(range(6))


async def test_a_client_gone_from_the_queue_gives_its_place_up() -> None:
    backend = GatedBackend()
    settings = limits(max_inflight_requests=1, max_queued_requests=1, max_queue_wait_s=30)
    async with serve(backend, settings=settings) as url, aiohttp.ClientSession() as http:
        running = asyncio.create_task(post(http, f"{url}{COMPLETIONS}", COMPLETION))
        await eventually(lambda: backend.started == 1)
        async with aiohttp.ClientSession() as leaving:
            queued = asyncio.create_task(post(leaving, f"{url}{COMPLETIONS}", COMPLETION))
            await asyncio.sleep(0.2)
            status, _, _ = await post(http, f"{url}{COMPLETIONS}", COMPLETION)
            assert status == 429  # the queue's one place is taken
            queued.cancel()
        await asyncio.sleep(0.2)  # the server noticed the closed connection
        waiting = asyncio.create_task(post(http, f"{url}{COMPLETIONS}", COMPLETION))
        await asyncio.sleep(0.2)
        backend.gate.set()
        assert (await asyncio.wait_for(running, 5))[0] == 200
        assert (await asyncio.wait_for(waiting, 5))[0] == 200
        assert backend.started == 2  # the one that left never reached the system


async def test_one_key_cannot_take_every_slot() -> None:
    backend = GatedBackend()
    settings = limits(
        api_key=KEYS, max_inflight_requests=4, max_queued_requests=4, max_requests_per_key=2
    )
    async with serve(backend, settings=settings) as url, aiohttp.ClientSession() as http:
        greedy = [
            asyncio.create_task(post(http, f"{url}{COMPLETIONS}", COMPLETION, "sk-first-key"))
            for _ in range(2)
        ]
        await eventually(lambda: backend.started == 2)
        status, headers, body = await post(http, f"{url}{COMPLETIONS}", COMPLETION, "sk-first-key")
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert_error(body, "rate_limit_error", "key_limit")
        other = asyncio.create_task(post(http, f"{url}{COMPLETIONS}", COMPLETION, "sk-second-key"))
        await eventually(lambda: backend.started == 3)  # the other tenant got a slot
        backend.gate.set()
        assert (await asyncio.wait_for(other, 5))[0] == 200
        assert [s for s, _, _ in await asyncio.gather(*greedy)] == [200, 200]
        # The first key's slots came back.
        assert (await post(http, f"{url}{COMPLETIONS}", COMPLETION, "sk-first-key"))[0] == 200


async def test_no_instance_of_a_needed_role_is_503_at_once() -> None:
    backend = ScriptedBackend()
    backend.roles["prefill"] = 0
    async with serve(backend) as url, aiohttp.ClientSession() as http:
        status, headers, body = await post(http, f"{url}{CHAT}", {"messages": USER})
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert "prefill" in assert_error(body, "server_error", "no_capacity")
    assert backend.requests == []


async def test_a_system_503_carries_retry_after(backend: ScriptedBackend) -> None:
    from services.gateway.backend import GenerationError

    backend.fail_before = GenerationError("no KV blocks freed in 60 s", 503)
    async with serve(backend) as url, aiohttp.ClientSession() as http:
        status, headers, body = await post(http, f"{url}{COMPLETIONS}", COMPLETION)
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert_error(body, "server_error", "service_unavailable")


# --- body size -----------------------------------------------------------------------------


async def test_a_body_over_the_limit_is_413_and_the_server_stays_up() -> None:
    settings = limits(max_request_body_bytes=4096)
    backend = ScriptedBackend()
    async with serve(backend, settings=settings) as url, aiohttp.ClientSession() as http:
        big = {"prompt": "a", "max_tokens": 2, "user": "x" * 5000}
        status, _, body = await post(http, f"{url}{COMPLETIONS}", big)
        assert status == 413
        assert "4096" in assert_error(body, "invalid_request_error", "request_too_large")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: read until too large
            yield b'{"prompt": "a", "user": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        async with http.post(f"{url}{CHAT}", data=chunks()) as response:
            assert response.status == 413
            assert_error(await response.json(), "invalid_request_error", "request_too_large")
        just_fits = {"prompt": "a", "max_tokens": 2, "user": "x" * 3000}
        assert (await post(http, f"{url}{COMPLETIONS}", just_fits))[0] == 200
    assert len(backend.requests) == 1


# --- unsupported fields --------------------------------------------------------------------

UNSUPPORTED: list[tuple[str, dict[str, Any]]] = [
    (CHAT, {"n": 2}),
    (COMPLETIONS, {"n": 3}),
    (CHAT, {"logprobs": True}),
    (CHAT, {"top_logprobs": 2}),
    (COMPLETIONS, {"logprobs": 0}),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}),
    (CHAT, {"tool_choice": "required"}),
    (CHAT, {"functions": [{"name": "f"}]}),
    (CHAT, {"function_call": {"name": "f"}}),
    (CHAT, {"response_format": {"type": "json_object"}}),
    (CHAT, {"audio": {"voice": "alloy", "format": "wav"}}),
    (CHAT, {"modalities": ["text", "audio"]}),
    (CHAT, {"reasoning_effort": "low"}),
    (CHAT, {"web_search_options": {}}),
    (CHAT, {"store": True}),
    (CHAT, {"frequency_penalty": 0.5}),
    (COMPLETIONS, {"presence_penalty": -1}),
    (COMPLETIONS, {"logit_bias": {"5": 100}}),
    (COMPLETIONS, {"best_of": 2}),
    (COMPLETIONS, {"suffix": "end"}),
    (COMPLETIONS, {"echo": True}),
    (COMPLETIONS, {"min_p": 0.1}),
    (CHAT, {"repetition_penalty": 1.3}),
    (COMPLETIONS, {"min_tokens": 4}),
    (CHAT, {"guided_json": {"type": "object"}}),
    (CHAT, {"use_beam_search": True}),
    (CHAT, {"chat_template": "{{ messages }}"}),
]
OFF_VALUES: list[tuple[str, dict[str, Any]]] = [
    (CHAT, {"n": 1, "logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none"}),
    (CHAT, {"response_format": {"type": "text"}, "store": False, "modalities": ["text"]}),
    (CHAT, {"frequency_penalty": 0, "presence_penalty": 0.0, "service_tier": "auto"}),
    (COMPLETIONS, {"n": 1, "best_of": 1, "echo": False, "suffix": None, "logprobs": None}),
    (COMPLETIONS, {"min_p": 0, "repetition_penalty": 1.0, "skip_special_tokens": True}),
    (CHAT, {"user": "u", "metadata": {"a": "b"}, "parallel_tool_calls": True}),
]


def _body(path: str, extra: dict[str, Any]) -> dict[str, Any]:
    base = {"messages": USER} if path == CHAT else {"prompt": "a"}
    return {**base, "max_tokens": 2, **extra}


@pytest.mark.parametrize(
    ("path", "extra"),
    UNSUPPORTED,
    ids=[f"{'chat' if p == CHAT else 'completions'}-{next(iter(e))}" for p, e in UNSUPPORTED],
)
async def test_unsupported_field_is_400_naming_it(
    base_url: str, session: aiohttp.ClientSession, path: str, extra: dict[str, Any]
) -> None:
    (name,) = extra
    status, _, body = await post(session, f"{base_url}{path}", _body(path, extra))
    assert status == 400
    message = assert_error(body, "invalid_request_error", None)
    assert body["error"]["param"] == name
    assert message.startswith(f"{name}=") and "not supported" in message


@pytest.mark.parametrize(("path", "extra"), OFF_VALUES)
async def test_unsupported_field_at_its_off_value_is_served(
    base_url: str, session: aiohttp.ClientSession, path: str, extra: dict[str, Any]
) -> None:
    status, _, body = await post(session, f"{base_url}{path}", _body(path, extra))
    assert status == 200, body


async def test_a_long_unsupported_value_is_quoted_short(
    base_url: str, session: aiohttp.ClientSession
) -> None:
    tools = [{"type": "function", "function": {"name": "f" * 5000}}]
    _, _, body = await post(session, f"{base_url}{CHAT}", _body(CHAT, {"tools": tools}))
    assert len(body["error"]["message"]) < 200


# --- /metrics on the API port ---------------------------------------------------------------


async def test_metrics_on_the_api_port_count_shed_requests() -> None:
    backend = GatedBackend()
    settings = limits(max_inflight_requests=1, max_queued_requests=0)

    async def shed_total(http: aiohttp.ClientSession, url: str) -> float:
        async with http.get(f"{url}/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert ("hetserve_requests_total", (("outcome", "finished"),)) in samples
        return samples[("hetserve_shed_requests_total", (("reason", "queue_full"),))]

    async with serve(backend, settings=settings) as url, aiohttp.ClientSession() as http:
        before = await shed_total(http, url)
        running = asyncio.create_task(post(http, f"{url}{COMPLETIONS}", COMPLETION))
        await eventually(lambda: backend.started == 1)
        for _ in range(3):
            assert (await post(http, f"{url}{COMPLETIONS}", COMPLETION))[0] == 429
        assert await shed_total(http, url) == before + 3
        backend.gate.set()
        await running
