"""The gateway's OpenAI-compatible HTTP API: routes, handlers and their error boundary."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from proto.messages import ROLES, GenerateRequest, TokenEvent
from services.common import metrics
from services.common.settings import GatewaySettings
from services.gateway.admission import Admission, AdmissionLimits, Shed
from services.gateway.auth import OPEN_PATHS, ApiKeys, Unauthorized
from services.gateway.backend import Backend, GenerationError
from services.gateway.openai_schema import (
    ChatRequest,
    CompletionRequest,
    InvalidRequest,
    Prepared,
    ServedModel,
    parse_request,
    prepare_chat,
    prepare_completion,
)
from services.gateway.responses import (
    SSE_DONE,
    ChatBodies,
    CompletionBodies,
    ResponseBodies,
    error_body,
    new_request_id,
    sse_event,
)
from services.hf.text_stream import IncrementalDetokenizer, StopStringMatcher
from services.hf.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
ADMISSION = web.AppKey("admission", Admission)
_TENANT = web.RequestKey("tenant", str)  # which API key the request presented
# Without an instance of each of these no request can be served: 503 at once, not a wait.
_ROLES_EVERY_REQUEST_NEEDS = ("scheduler", "prefill", "decode")
_NO_CAPACITY_RETRY_AFTER_S = 5  # about a heartbeat TTL: when a restarted instance is back


def create_app(
    backend: Backend, tokenizer: Tokenizer, settings: GatewaySettings | None = None
) -> web.Application:
    """The OpenAI API over `backend`, with the API keys, admission limits and body size limit
    of `settings` (default: from the environment). Serve it with `handler_cancellation=True`
    (AppRunner or run_app) so that a client that disconnects early is noticed at once."""
    settings = settings or GatewaySettings()
    admission = Admission(
        AdmissionLimits(
            max_inflight=settings.max_inflight_requests,
            max_queued=settings.max_queued_requests,
            max_queue_wait_s=settings.max_queue_wait_s,
            max_per_key=settings.max_requests_per_key,
        )
    )
    keys = ApiKeys(settings.api_key.get_secret_value())
    api = _OpenAIHandlers(backend, tokenizer, admission, settings.max_request_body_bytes)
    app = web.Application(
        middlewares=[_error_boundary, _authenticate(keys)],
        client_max_size=settings.max_request_body_bytes,
    )
    app[ADMISSION] = admission
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/chat/completions", api.chat_completions)
    app.router.add_get("/v1/models", api.models)
    app.router.add_get("/health", api.health)
    app.router.add_get("/metrics", _metrics)
    return app


_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error"}


def _error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    retry_after: int | None = None,
) -> web.Response:
    error_type = _ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    response = web.json_response(error_body(message, param, code, error_type), status=status)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


@web.middleware
async def _error_boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InvalidRequest as exc:
        return _error_response(exc.status, exc.message, exc.param, exc.code)
    except Unauthorized as exc:
        metrics.UNAUTHORIZED.inc()
        response = _error_response(401, exc.message, code="invalid_api_key")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    except Shed as exc:
        return _error_response(
            exc.status, exc.message, code=exc.reason, retry_after=exc.retry_after
        )
    except GenerationError as exc:
        # A system that cannot serve now (503, e.g. no free KV blocks in time) says when to retry.
        retry_after = request.app[ADMISSION].retry_after() if exc.status == 503 else None
        return _error_response(exc.status, str(exc), code=exc.code, retry_after=retry_after)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error_response(exc.status, f"{exc.reason} ({request.method} {request.path})")
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return _error_response(500, "Internal server error", code="internal_error")


def _authenticate(keys: ApiKeys):  # noqa: ANN202 - an aiohttp middleware
    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if keys.enabled and request.path not in OPEN_PATHS:
            request[_TENANT] = keys.tenant(request.headers.get("Authorization"))
        return await handler(request)

    return authenticate


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


class _OpenAIHandlers:
    def __init__(
        self, backend: Backend, tokenizer: Tokenizer, admission: Admission, max_body_bytes: int
    ):
        self.backend = backend
        self.tokenizer = tokenizer
        self.admission = admission
        self.max_body_bytes = max_body_bytes
        self.started = int(time.time())

    def _served(self) -> ServedModel:
        return ServedModel(
            self.backend.model_name, self.backend.max_model_len, self.tokenizer.vocab_size
        )

    async def completions(self, request: web.Request) -> web.StreamResponse:
        async with self._admitted(request):
            parsed = parse_request(await self._body(request), CompletionRequest)
            prepared = prepare_completion(parsed, self.tokenizer, self._served())
            return await self._serve(request, prepared, CompletionBodies)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        async with self._admitted(request):
            parsed = parse_request(await self._body(request), ChatRequest)
            prepared = prepare_chat(parsed, self.tokenizer, self._served())
            return await self._serve(request, prepared, ChatBodies)

    def _admitted(self, request: web.Request) -> contextlib.AbstractAsyncContextManager[None]:
        """An in-flight slot for the request, or Shed. What can be refused without waiting
        (a body too large, a system with no capacity at all) is refused first."""
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise self._too_large(request.content_length)
        missing = [r for r in self.backend.missing_roles() if r in _ROLES_EVERY_REQUEST_NEEDS]
        if missing:
            raise self.admission.shed(
                503,
                "no_capacity",
                f"No live {' or '.join(missing)} instance: the system cannot serve requests now",
                retry_after=_NO_CAPACITY_RETRY_AFTER_S,
            )
        return self.admission.slot(request.get(_TENANT))

    async def _body(self, request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:  # a body without (or with a false) length
            raise self._too_large(None) from None

    def _too_large(self, size: int | None) -> InvalidRequest:
        limit = self.max_body_bytes
        message = (
            f"The request body is {size} bytes; this server accepts at most {limit}"
            if size is not None
            else f"The request body is larger than {limit} bytes, the most this server accepts"
        )
        return InvalidRequest(message, status=413, code="request_too_large")

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.backend.model_name,
            "object": "model",
            "created": self.started,
            "owned_by": "hetserve",
            "max_model_len": self.backend.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        live = self.backend.live_roles()
        roles = {role: live.get(role, 0) for role in ROLES}
        roles["gateway"] = max(roles["gateway"], 1)  # this process is one, heartbeat or not
        missing = self.backend.missing_roles()
        body = {"status": "unavailable" if missing else "ok", "roles": roles, "missing": missing}
        return web.json_response(body, status=503 if missing else 200)

    async def _serve(
        self, request: web.Request, prepared: Prepared, bodies_type: type[ResponseBodies]
    ) -> web.StreamResponse:
        bodies = bodies_type(
            request_id=new_request_id(bodies_type.kind),
            model=self.backend.model_name,
            prompt_token_ids=prepared.prompt_token_ids,
            return_token_ids=prepared.return_token_ids,
            include_usage=prepared.include_usage,
        )
        generate = GenerateRequest(
            request_id=bodies.id,
            prompt_token_ids=prepared.prompt_token_ids,
            sampling=prepared.sampling,
            submitted_at=time.time(),
            pin_prefill=prepared.route.prefill_instance if prepared.route else "",
            pin_decode=prepared.route.decode_instance if prepared.route else "",
        )
        events = self.backend.generate(generate)
        # Closing `events` aborts the request in the system. It must happen however this
        # handler ends: finished, failed, client gone (write error or handler cancelled).
        try:
            deltas = _text_deltas(events, self.tokenizer, prepared)
            async with contextlib.aclosing(deltas):
                if prepared.stream:
                    return await _stream(request, deltas, bodies)
                return await _whole(deltas, bodies)
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()


async def _whole(deltas: AsyncIterator[Delta], bodies: ResponseBodies) -> web.Response:
    text: list[str] = []
    token_ids: list[int] = []
    async for delta in deltas:
        text.append(delta.text)
        token_ids += delta.token_ids
        bodies.saw(delta.cached_tokens)
        if delta.finish_reason is not None:
            body = bodies.whole("".join(text), token_ids, delta.finish_reason, delta.stop_reason)
            return web.json_response(body)
    raise AssertionError("unreachable: _text_deltas always ends with a finish reason")


async def _stream(
    request: web.Request, deltas: AsyncIterator[Delta], bodies: ResponseBodies
) -> web.StreamResponse:
    # Wait for the first tokens before sending headers, so that a request the system cannot
    # serve at all still gets a plain HTTP error status.
    first = await anext(deltas)
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        await _send_chunks(response, first, deltas, bodies)
        await response.write(SSE_DONE)
        await response.write_eof()
    except ConnectionError:
        log.info("client went away during %s; request aborted", bodies.id)
    return response


async def _send_chunks(
    response: web.StreamResponse, first: Delta, deltas: AsyncIterator[Delta], bodies: ResponseBodies
) -> None:
    """Every chunk before [DONE]; a failure once the headers are out becomes an error event."""
    try:
        if (chunk := bodies.first_chunk()) is not None:
            await response.write(sse_event(chunk))
        completion_tokens = 0
        delta: Delta | None = first
        while delta is not None:
            completion_tokens += len(delta.token_ids)
            bodies.saw(delta.cached_tokens)
            if delta.text or (bodies.return_token_ids and delta.token_ids):
                await response.write(sse_event(bodies.delta_chunk(delta.text, delta.token_ids)))
            if delta.finish_reason is not None:
                chunk = bodies.finish_chunk(delta.finish_reason, delta.stop_reason)
                await response.write(sse_event(chunk))
            delta = await anext(deltas, None)
        if bodies.include_usage:
            await response.write(sse_event(bodies.usage_chunk(completion_tokens)))
    except ConnectionError:
        raise  # the client is gone: nothing left to tell it
    except GenerationError as exc:
        error = error_body(str(exc), code=exc.code, error_type="server_error")
        await response.write(sse_event(error))
    except Exception:
        log.exception("unhandled error while streaming %s", bodies.id)
        error = error_body(
            "Internal server error", code="internal_error", error_type="server_error"
        )
        await response.write(sse_event(error))


@dataclass
class Delta:
    """New text and the tokens that produced it; the last one carries the finish reason."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    cached_tokens: int | None = None  # prompt tokens served from a prefix cache (first event)


async def _text_deltas(
    events: AsyncIterator[TokenEvent], tokenizer: Tokenizer, prepared: Prepared
) -> AsyncIterator[Delta]:
    """Detokenise token events incrementally and cut the text before the first stop string
    (the engine stops there too; whichever sees it first ends the request)."""
    sampling = prepared.sampling
    detokenizer = IncrementalDetokenizer(tokenizer, prepared.prompt_token_ids)
    stops = StopStringMatcher(sampling.stop)
    stop_tokens = set(sampling.stop_token_ids) | set(tokenizer.eos_token_ids)
    generated = 0
    async for event in events:
        text: list[str] = []
        for position, token_id in enumerate(event.token_ids, start=1):
            generated += 1
            ends_on_stop_token = (
                position == len(event.token_ids)
                and event.finish_reason == "stop"
                and not isinstance(event.stop_reason, str)
                and token_id in stop_tokens
            )
            if ends_on_stop_token:
                continue  # as vLLM: the EOS or stop token counts, but its text is not shown
            match = stops.feed(detokenizer.feed([token_id]))
            text.append(match.text)
            if match.stop is not None:
                tokens = event.token_ids[:position]
                yield Delta("".join(text), tokens, "stop", match.stop, event.cached_tokens)
                return
        finish = event.finish_reason or ("length" if generated >= sampling.max_tokens else None)
        if finish is not None:
            stop_reason = event.stop_reason
            match = stops.feed(detokenizer.flush())
            text += [match.text, stops.flush()]
            if match.stop is not None:
                finish, stop_reason = "stop", match.stop
            yield Delta("".join(text), event.token_ids, finish, stop_reason, event.cached_tokens)
            return
        yield Delta("".join(text), event.token_ids, cached_tokens=event.cached_tokens)
    raise GenerationError("the backend ended a request without a finish reason", 502, "bad_gateway")
