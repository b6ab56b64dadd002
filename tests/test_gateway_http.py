"""The gateway's HTTP layer over an in-test backend: the official OpenAI client for the happy
paths, raw HTTP for malformed input, SSE framing, errors and client disconnects.
(The whole system behind it, over NATS, is tested end to end elsewhere.)"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from proto.messages import ROLES, GenerateRequest, TokenEvent
from services.common.settings import GatewaySettings
from services.gateway.backend import GenerationError
from services.gateway.http_app import create_app
from services.hf.tokenizer import ChatTemplateError, Tokenizer

MODEL = "tiny-llama"
MAX_MODEL_LEN = 64
REPLY = "Hello world, how are you?"
ALL_ROLES_UP = {"gateway": 1, "scheduler": 1, "prefill": 2, "decode": 1, "converter": 1}


class CharTokenizer:
    """One token per character, <s> = 0 and </s> = 1; a ChatML-like chat template."""

    SPECIALS = ("<s>", "</s>")
    ALPHABET = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?:;'-\n<>|/"
    vocab_size = len(SPECIALS) + len(ALPHABET)
    eos_token_ids = [1]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [0] if add_special_tokens else []
        i = 0
        while i < len(text):
            special = next((s for s in self.SPECIALS if text.startswith(s, i)), None)
            if special is not None:
                ids.append(self.SPECIALS.index(special))
                i += len(special)
            else:
                ids.append(len(self.SPECIALS) + self.ALPHABET.index(text[i]))
                i += 1
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        n = len(self.SPECIALS)
        return "".join(
            self.ALPHABET[i - n] if i >= n else "" if skip_special_tokens else self.SPECIALS[i]
            for i in ids
        )

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        n = len(self.SPECIALS)
        return [self.ALPHABET[i - n] if i >= n else self.SPECIALS[i] for i in ids]

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        roles = [m["role"] for m in messages if m["role"] != "system"]
        if any(a == b for a, b in itertools.pairwise(roles)):
            raise ChatTemplateError(
                "Conversation roles must alternate user/assistant/user/assistant"
            )
        text = "<s>" + "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


TOK = CharTokenizer()


class ScriptedBackend:
    """Answers every request with REPLY then EOS (repeated if ignore_eos), a few tokens per
    event, stopping as the engine does: EOS, stop token ids, stop strings, max_tokens."""

    model_name = MODEL
    max_model_len = MAX_MODEL_LEN

    def __init__(self, tokenizer: Any = TOK, reply: str = REPLY) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_ids[0]
        self.roles = dict(ALL_ROLES_UP)
        self.reply_ids = tokenizer.encode(reply, add_special_tokens=False) + [self.eos]
        self.tokens_per_event = 2
        self.engine_stops_on_strings = True
        self.endless = False  # ignore every stop condition and max_tokens
        self.stall_after_events: int | None = None  # then wait forever
        self.fail_before: Exception | None = None
        self.fail_after_events: tuple[int, Exception] | None = None
        self.requests: list[GenerateRequest] = []
        self.tokens_sent: dict[str, int] = {}
        self.called = asyncio.Event()
        self.closed: dict[str, asyncio.Event] = {}

    def live_roles(self) -> dict[str, int]:
        return dict(self.roles)

    def missing_roles(self) -> list[str]:
        return [r for r in ROLES if r != "gateway" and self.roles.get(r, 0) < 1]

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        self.requests.append(request)
        self.called.set()
        self.closed[request.request_id] = asyncio.Event()
        try:
            if self.fail_before is not None:
                raise self.fail_before
            async for event in self._events(request):
                yield event
        finally:
            self.closed[request.request_id].set()

    async def _events(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        sampling, out, pending, events = request.sampling, [], [], 0
        for token in itertools.cycle(self.reply_ids):
            out.append(token)
            pending.append(token)
            self.tokens_sent[request.request_id] = len(out)
            finish, reason = self._finish(out, sampling)
            if finish is not None or len(pending) == self.tokens_per_event:
                if self.fail_after_events and events == self.fail_after_events[0]:
                    raise self.fail_after_events[1]
                if self.stall_after_events is not None and events == self.stall_after_events:
                    await asyncio.Event().wait()
                yield TokenEvent(
                    request_id=request.request_id,
                    index=len(out) - len(pending),
                    token_ids=pending,
                    finish_reason=finish,
                    stop_reason=reason,
                )
                events, pending = events + 1, []
                await asyncio.sleep(0.005 if self.endless else 0)
            if finish is not None:
                return

    def _finish(self, out: list[int], sampling: Any) -> tuple[str | None, str | int | None]:
        if self.endless:
            return None, None
        if out[-1] == self.eos and not sampling.ignore_eos:
            return "stop", None
        if out[-1] in sampling.stop_token_ids:
            return "stop", out[-1]
        text = self.tokenizer.decode(out)
        hit = next((s for s in sampling.stop if s in text), None)
        if self.engine_stops_on_strings and hit is not None:
            return "stop", hit
        if len(out) >= sampling.max_tokens:
            return "length", None
        return None, None


@contextlib.asynccontextmanager
async def serve(
    backend: ScriptedBackend,
    handler_cancellation: bool = True,
    settings: GatewaySettings | None = None,
) -> AsyncIterator[str]:
    app = create_app(backend, backend.tokenizer, settings or GatewaySettings())
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
async def base_url(backend: ScriptedBackend) -> AsyncIterator[str]:
    async with serve(backend) as url:
        yield url


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0) as c:
        yield c


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat_prompt_ids(messages: list[dict[str, str]]) -> list[int]:
    return TOK.encode(TOK.apply_chat_template(messages), add_special_tokens=False)


async def sse_events(response: aiohttp.ClientResponse) -> list[Any]:
    """Every `data:` payload of an SSE body, JSON-decoded except the final [DONE]."""
    body = (await response.read()).decode()
    assert body.endswith("\n\n")
    events = [block.removeprefix("data: ") for block in body.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]] + ["[DONE]"]


USER = [{"role": "user", "content": "Hi there"}]


# --- happy paths through the official client -------------------------------------------------


async def test_chat_completion(client: openai.AsyncOpenAI, backend: ScriptedBackend) -> None:
    completion = await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=30)
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLY  # EOS counts as a token but shows no text
    assert choice.finish_reason == "stop"
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion" and completion.model == MODEL
    prompt_ids = chat_prompt_ids(USER)
    assert prompt_ids.count(0) == 1  # BOS once: the template has it, encode adds none
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == len(REPLY) + 1
    assert completion.usage.total_tokens == len(prompt_ids) + len(REPLY) + 1
    sent = backend.requests[0]
    assert sent.prompt_token_ids == prompt_ids and sent.sampling.max_tokens == 30
    assert sent.request_id == completion.id and re.fullmatch(r"[A-Za-z0-9_-]+", sent.request_id)


async def test_chat_max_tokens_defaults_to_rest_of_context(
    client: openai.AsyncOpenAI, backend: ScriptedBackend
) -> None:
    await client.chat.completions.create(model=MODEL, messages=USER)
    assert backend.requests[0].sampling.max_tokens == MAX_MODEL_LEN - len(chat_prompt_ids(USER))


async def test_chat_text_parts_and_sampling_fields(
    client: openai.AsyncOpenAI, backend: ScriptedBackend
) -> None:
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "you"}],
        },
    ]
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=5,
        temperature=0,
        top_p=0.5,
        seed=7,
        user="someone",
        extra_body={"top_k": 3, "ignore_eos": True, "stop_token_ids": [9]},
    )
    assert completion.choices[0].message.content == "Hello"
    assert completion.choices[0].finish_reason == "length"
    sent = backend.requests[0]
    flat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nyou"}]
    assert sent.prompt_token_ids == chat_prompt_ids(flat)
    s = sent.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (5, 0.0, 0.5, 3, 7)
    assert s.ignore_eos and s.stop_token_ids == [9]


async def test_chat_stream(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(REPLY) + 1
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


async def test_chat_stream_framing(base_url: str, http: aiohttp.ClientSession) -> None:
    """Chunk order exactly as OpenAI sends it: role, content, finish, usage, [DONE]."""
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{base_url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(response)
    role, *content, finish, usage, done = events
    assert role["object"] == "chat.completion.chunk"
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(e["choices"][0]["delta"]) == {"content"} for e in content)
    assert "".join(e["choices"][0]["delta"]["content"] for e in content) == REPLY
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert all(e["usage"] is None for e in [role, *content, finish])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(REPLY) + 1
    assert done == "[DONE]"


async def test_completion_text_prompt(client: openai.AsyncOpenAI, backend: ScriptedBackend) -> None:
    completion = await client.completions.create(model=MODEL, prompt="Say hi", max_tokens=5)
    assert completion.choices[0].text == "Hello"
    assert completion.choices[0].finish_reason == "length"
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 5)
    assert backend.requests[0].prompt_token_ids == TOK.encode("Say hi")  # with BOS
    await client.completions.create(model=MODEL, prompt="Say hi")
    assert backend.requests[1].sampling.max_tokens == 16  # OpenAI's default


async def test_completion_token_ids_with_return_token_ids(
    client: openai.AsyncOpenAI, backend: ScriptedBackend
) -> None:
    prompt = [0, 10, 11, 12]
    completion = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, extra_body={"return_token_ids": True}
    )
    choice = completion.choices[0].model_dump()
    assert choice["text"] == "Hello "
    assert choice["prompt_token_ids"] == prompt
    assert choice["token_ids"] == backend.reply_ids[:6]
    assert backend.requests[0].prompt_token_ids == prompt


@pytest.mark.parametrize("prompt", [["Say hi"], [[0, 10, 11]]])
async def test_completion_single_prompt_in_a_list(client: openai.AsyncOpenAI, prompt: Any) -> None:
    completion = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert completion.choices[0].text == "He"


async def test_completion_stream_with_token_ids(
    client: openai.AsyncOpenAI, backend: ScriptedBackend
) -> None:
    stream = await client.completions.create(
        model=MODEL,
        prompt=[0, 10],
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True},
    )
    chunks = [c.model_dump() async for c in stream]
    with_choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["text"] for c in with_choices) == "Hello w"
    assert [c.get("prompt_token_ids") for c in with_choices] == [[0, 10]] + [None] * (
        len(with_choices) - 1
    )
    streamed_ids = [t for c in with_choices for t in c.get("token_ids") or []]
    assert streamed_ids == backend.reply_ids[:7]
    assert with_choices[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 7


async def test_chat_return_token_ids(client: openai.AsyncOpenAI, backend: ScriptedBackend) -> None:
    extra = {"return_token_ids": True}
    whole = await client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=3, extra_body=extra
    )
    body = whole.model_dump()
    assert body["prompt_token_ids"] == chat_prompt_ids(USER)
    assert body["choices"][0]["token_ids"] == backend.reply_ids[:3]

    stream = await client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=3, stream=True, extra_body=extra
    )
    chunks = [c.model_dump() async for c in stream]
    assert chunks[0]["prompt_token_ids"] == chat_prompt_ids(USER)
    assert all(c.get("prompt_token_ids") is None for c in chunks[1:])
    streamed = [t for c in chunks for t in c["choices"][0].get("token_ids") or []]
    assert streamed == backend.reply_ids[:3]


@pytest.mark.parametrize("engine_stops", [True, False], ids=["engine-stops", "gateway-stops"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_stop_string_across_deltas(
    client: openai.AsyncOpenAI, backend: ScriptedBackend, engine_stops: bool, stream: bool
) -> None:
    """'lo w' spans three events of two tokens each; the text ends just before it."""
    backend.engine_stops_on_strings = engine_stops
    kwargs: Any = {"model": MODEL, "prompt": "x", "max_tokens": 20, "stop": ["zzz", "lo w"]}
    if stream:
        chunks = [c async for c in await client.completions.create(stream=True, **kwargs)]
        text = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        completion = await client.completions.create(**kwargs)
        text, finish = completion.choices[0].text, completion.choices[0].finish_reason
    assert (text, finish) == ("Hel", "stop")
    request_id = backend.requests[0].request_id
    await asyncio.wait_for(backend.closed[request_id].wait(), 2)
    # The engine stops at the token that completes the stop string; when only the gateway
    # sees it, it closes the iterator after that event (two tokens: "wo").
    assert backend.tokens_sent[request_id] == len("Hello w" if engine_stops else "Hello wo")


async def test_stop_token_id_ends_without_its_text(client: openai.AsyncOpenAI) -> None:
    comma = TOK.encode(",", add_special_tokens=False)[0]
    completion = await client.completions.create(
        model=MODEL,
        prompt="x",
        max_tokens=20,
        extra_body={"stop_token_ids": [comma], "return_token_ids": True},
    )
    choice = completion.choices[0].model_dump()
    assert choice["text"] == "Hello world"
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == comma
    assert choice["token_ids"][-1] == comma


async def test_models(client: openai.AsyncOpenAI) -> None:
    models = [m async for m in client.models.list()]
    assert [m.id for m in models] == [MODEL]


# --- the real Tokenizer ----------------------------------------------------------------------

REAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'system' and not loop.first %}{{ raise_exception('system goes first') }}"
    "{% endif %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def byte_level_tokenizer() -> Tokenizer:
    """A real Tokenizer on a byte-level BPE so small that é and ✓ span several tokens."""
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["hello world, hello there"] * 20, trainer)
    return Tokenizer(
        bpe,
        eos_token_ids=[1],
        bos_token_id=0,
        special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
        chat_template=REAL_TEMPLATE,
    )


async def test_real_tokenizer_streams_multibyte_text_intact() -> None:
    tokenizer = byte_level_tokenizer()
    reply = "héllo wörld ✓ done"
    backend = ScriptedBackend(tokenizer, reply)
    backend.tokens_per_event = 1
    assert len(backend.reply_ids) > len(reply) + 1  # some characters are several tokens
    async with serve(backend) as url, aiohttp.ClientSession() as http:
        body = {"prompt": "hello", "max_tokens": 60, "stream": True}
        async with http.post(f"{url}{COMPLETIONS}", json=body) as response:
            events = await sse_events(response)
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == reply
    assert not any("\ufffd" in t for t in texts)  # partial characters were held back


async def test_real_tokenizer_chat_template(http: aiohttp.ClientSession) -> None:
    tokenizer = byte_level_tokenizer()
    backend = ScriptedBackend(tokenizer, "hi")
    async with serve(backend) as url:
        body = {"messages": USER, "max_tokens": 5}
        async with http.post(f"{url}{CHAT}", json=body) as response:
            assert (await response.json())["choices"][0]["message"]["content"] == "hi"
        expected = tokenizer.encode("<s><user>Hi there\n<assistant>", add_special_tokens=False)
        assert backend.requests[0].prompt_token_ids == expected
        assert expected.count(0) == 1

        late_system = {"messages": USER + [{"role": "system", "content": "x"}]}
        async with http.post(f"{url}{CHAT}", json=late_system) as response:
            assert response.status == 400
            error = (await response.json())["error"]
        assert error["param"] == "messages" and "system goes first" in error["message"]


# --- health ----------------------------------------------------------------------------------


async def test_health(base_url: str, http: aiohttp.ClientSession, backend: ScriptedBackend) -> None:
    backend.roles["gateway"] = 0  # the answering gateway counts itself
    async with http.get(f"{base_url}/health") as response:
        assert response.status == 200
        body = await response.json()
    assert body["roles"] == {**ALL_ROLES_UP, "gateway": 1} and body["missing"] == []

    del backend.roles["decode"]
    backend.roles["converter"] = 0
    async with http.get(f"{base_url}/health") as response:
        assert response.status == 503
        body = await response.json()
    assert body["missing"] == ["decode", "converter"]


# --- bad input -------------------------------------------------------------------------------

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
LONG_PROMPT = [5] * 60

BAD_REQUESTS: list[tuple[str, str, Any, int, str | None, str | None]] = [
    # (case, path, body, status, param, code)
    ("invalid-json", CHAT, b'{"messages": [', 400, None, None),
    ("not-an-object", COMPLETIONS, b"[1, 2]", 400, None, None),
    ("empty-body", COMPLETIONS, b"", 400, None, None),
    ("missing-prompt", COMPLETIONS, {"model": MODEL}, 400, "prompt", None),
    ("missing-messages", CHAT, {"model": MODEL}, 400, "messages", None),
    ("no-messages", CHAT, {"messages": []}, 400, "messages", None),
    ("missing-content", CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content", None),
    ("prompt-type", COMPLETIONS, {"prompt": 5}, 400, "prompt", None),
    ("prompt-mixed-list", COMPLETIONS, {"prompt": [1, "a"]}, 400, "prompt", None),
    ("max-tokens-string", COMPLETIONS, {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens", None),
    ("max-tokens-float", COMPLETIONS, {"prompt": "a", "max_tokens": 5.5}, 400, "max_tokens", None),
    ("stream-type", CHAT, {"messages": USER, "stream": "yes"}, 400, "stream", None),
    ("content-type", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ("image-part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content", None),
    ("role", CHAT, {"messages": [{"role": "wizard", "content": "a"}]}, 400, "messages[0].role", None),
    ("max-tokens-zero", COMPLETIONS, {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", None),
    ("max-tokens-negative", CHAT, {"messages": USER, "max_tokens": -3}, 400, "max_tokens", None),
    ("max-completion-tokens-zero", CHAT, {"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens", None),
    ("temperature-negative", CHAT, {"messages": USER, "temperature": -0.5}, 400, "temperature", None),
    ("top-p-zero", COMPLETIONS, {"prompt": "a", "top_p": 0}, 400, "top_p", None),
    ("top-p-above-one", COMPLETIONS, {"prompt": "a", "top_p": 1.5}, 400, "top_p", None),
    ("top-k", COMPLETIONS, {"prompt": "a", "top_k": -2}, 400, "top_k", None),
    ("seed-type", COMPLETIONS, {"prompt": "a", "seed": "x"}, 400, "seed", None),
    ("stop-type", COMPLETIONS, {"prompt": "a", "stop": 5}, 400, "stop", None),
    ("stop-empty", COMPLETIONS, {"prompt": "a", "stop": ""}, 400, "stop", None),
    ("prompt-plus-max-tokens-too-long", COMPLETIONS, {"prompt": LONG_PROMPT, "max_tokens": 10}, 400, "max_tokens", "context_length_exceeded"),
    ("prompt-alone-too-long", COMPLETIONS, {"prompt": [5] * 64, "max_tokens": 1}, 400, "prompt", "context_length_exceeded"),
    ("chat-prompt-too-long", CHAT, {"messages": [{"role": "user", "content": "a" * 70}]}, 400, "messages", "context_length_exceeded"),
    ("max-completion-tokens-too-long", CHAT, {"messages": USER, "max_completion_tokens": 60}, 400, "max_completion_tokens", "context_length_exceeded"),
    ("token-id-above-vocab", COMPLETIONS, {"prompt": [0, CharTokenizer.vocab_size]}, 400, "prompt", None),
    ("token-id-negative", COMPLETIONS, {"prompt": [0, -1]}, 400, "prompt", None),
    ("stop-token-id-above-vocab", COMPLETIONS, {"prompt": "a", "stop_token_ids": [10**6]}, 400, "stop_token_ids", None),
    ("empty-token-prompt", COMPLETIONS, {"prompt": []}, 400, "prompt", None),
    ("unknown-model", CHAT, {"model": "gpt-9", "messages": USER}, 404, "model", "model_not_found"),
    ("unknown-model-completions", COMPLETIONS, {"model": "gpt-9", "prompt": "a"}, 404, "model", "model_not_found"),
    ("batched-prompts", COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt", None),
    ("n", CHAT, {"messages": USER, "n": 2}, 400, "n", None),
    ("logprobs", COMPLETIONS, {"prompt": "a", "logprobs": 1}, 400, "logprobs", None),
    ("chat-logprobs", CHAT, {"messages": USER, "logprobs": True}, 400, "logprobs", None),
    ("echo", COMPLETIONS, {"prompt": "a", "echo": True}, 400, "echo", None),
    ("tools", CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools", None),
    ("stream-options-without-stream", CHAT, {"messages": USER, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("template-rejects", CHAT, {"messages": USER + USER}, 400, "messages", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_request(
    base_url: str,
    http: aiohttp.ClientSession,
    backend: ScriptedBackend,
    path: str,
    body: Any,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(f"{base_url}{path}", data=data) as response:
        assert response.status == status
        error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]
    assert backend.requests == []  # nothing reached the system
    # ... and the server stays healthy and serving.
    async with http.get(f"{base_url}/health") as response:
        assert response.status == 200
    async with http.post(f"{base_url}{COMPLETIONS}", json={"prompt": "a", "max_tokens": 2}) as r:
        assert r.status == 200 and (await r.json())["choices"][0]["text"] == "He"


async def test_context_length_message_names_both_numbers(
    base_url: str, http: aiohttp.ClientSession
) -> None:
    body = {"prompt": LONG_PROMPT, "max_tokens": 10}
    async with http.post(f"{base_url}{COMPLETIONS}", json=body) as response:
        message = (await response.json())["error"]["message"]
    assert "64" in message and "70" in message and "60" in message and "10" in message


@pytest.mark.parametrize(
    ("method", "path", "status"), [("GET", "/v1/nothing", 404), ("GET", COMPLETIONS, 405)]
)
async def test_unknown_route_has_openai_error_body(
    base_url: str, http: aiohttp.ClientSession, method: str, path: str, status: int
) -> None:
    async with http.request(method, f"{base_url}{path}") as response:
        assert response.status == status
        assert set((await response.json())["error"]) == {"message", "type", "param", "code"}


# --- failures behind the gateway -------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_generation_error_keeps_its_status(
    client: openai.AsyncOpenAI, backend: ScriptedBackend, stream: bool
) -> None:
    backend.fail_before = GenerationError("no decode instance is live", 503)
    with pytest.raises(openai.APIStatusError) as raised:
        await client.chat.completions.create(model=MODEL, messages=USER, stream=stream)
    assert raised.value.status_code == 503
    error = raised.value.body
    assert isinstance(error, dict) and "no decode instance" in error["message"]
    assert error["code"] == "service_unavailable"


async def test_unexpected_error_is_a_500_and_logged(
    base_url: str,
    http: aiohttp.ClientSession,
    backend: ScriptedBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend.fail_before = RuntimeError("bug")
    async with http.post(f"{base_url}{CHAT}", json={"messages": USER}) as response:
        assert response.status == 500
        assert (await response.json())["error"]["type"] == "server_error"
    assert any(r.exc_info and str(r.exc_info[1]) == "bug" for r in caplog.records)
    backend.fail_before = None
    async with http.post(f"{base_url}{CHAT}", json={"messages": USER}) as response:
        assert response.status == 200


async def test_error_mid_stream_is_an_sse_error_event(
    base_url: str, http: aiohttp.ClientSession, backend: ScriptedBackend
) -> None:
    backend.fail_after_events = (2, GenerationError("decode instance died", 503))
    body = {"prompt": "a", "max_tokens": 20, "stream": True}
    async with http.post(f"{base_url}{COMPLETIONS}", json=body) as response:
        assert response.status == 200
        events = await sse_events(response)
    assert [e["choices"][0]["text"] for e in events[:2]] == ["He", "ll"]
    assert "decode instance died" in events[2]["error"]["message"]
    assert events[3] == "[DONE]"
    await asyncio.wait_for(backend.closed[backend.requests[0].request_id].wait(), 2)


# --- client disconnects ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "handler_cancellation", [True, False], ids=["handler-cancelled", "write-fails"]
)
async def test_client_disconnect_closes_backend_iterator(
    backend: ScriptedBackend, handler_cancellation: bool
) -> None:
    """Cancelled handler: the backend stalls after its first event, so only aiohttp's
    cancellation can end it. Failed write: the backend never stops producing."""
    if handler_cancellation:
        backend.stall_after_events = 1
    else:
        backend.endless = True
    async with serve(backend, handler_cancellation) as url:
        async with aiohttp.ClientSession() as session:
            body = {"messages": USER, "stream": True}
            async with session.post(f"{url}{CHAT}", json=body) as response:
                assert response.status == 200
                await response.content.readuntil(b"\n\n")  # the role chunk: streaming began
        # The session is closed: the connection is gone.
        request_id = backend.requests[0].request_id
        await asyncio.wait_for(backend.closed[request_id].wait(), 5)


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_before_first_token_closes_backend_iterator(
    backend: ScriptedBackend, base_url: str, stream: bool
) -> None:
    backend.stall_after_events = 0
    async with aiohttp.ClientSession() as session:
        body = {"messages": USER, "stream": stream}
        post = asyncio.create_task(session.post(f"{base_url}{CHAT}", json=body))
        await asyncio.wait_for(backend.called.wait(), 5)
        post.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await post
    await asyncio.wait_for(backend.closed[backend.requests[0].request_id].wait(), 5)
