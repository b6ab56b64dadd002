"""OpenAI response bodies: whole responses, SSE chunks, error bodies.

Field names follow OpenAI; the token-id fields follow vLLM's `return_token_ids` extension:
completions carry `prompt_token_ids` and `token_ids` in each choice, chat carries
`prompt_token_ids` at the top level and `token_ids` in each choice. When streaming,
`prompt_token_ids` comes once, in the first chunk, and `token_ids` holds each chunk's tokens.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

Kind = Literal["completion", "chat"]
Body = dict[str, Any]

SSE_DONE = b"data: [DONE]\n\n"


def new_request_id(kind: Kind) -> str:
    """An id as OpenAI spells it that is also a valid NATS subject token ([A-Za-z0-9_-])."""
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def error_body(
    message: str,
    param: str | None = None,
    code: str | None = None,
    error_type: str = "invalid_request_error",
) -> Body:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def sse_event(body: Body) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Body:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class ResponseBodies:
    """Builds every body of one response; subclasses give the chat / completion shapes."""

    kind: Kind
    whole_object: str
    chunk_object: str

    def __init__(
        self,
        request_id: str,
        model: str,
        prompt_token_ids: list[int],
        return_token_ids: bool = False,
        include_usage: bool = False,
    ):
        self.id = request_id
        self.created = int(time.time())
        self.model = model
        self.prompt_token_ids = prompt_token_ids
        self.return_token_ids = return_token_ids
        self.include_usage = include_usage
        self.cached_tokens = 0  # prompt tokens a prefix cache served (OpenAI's usage field)

    def saw(self, cached_tokens: int | None) -> None:
        """The system's word on the prompt's cached tokens, as the first token event carries."""
        if cached_tokens is not None:
            self.cached_tokens = cached_tokens

    def whole(
        self, text: str, token_ids: list[int], finish_reason: str, stop_reason: str | int | None
    ) -> Body:
        choice = self._whole_choice(text)
        choice.update(logprobs=None, finish_reason=finish_reason, stop_reason=stop_reason)
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        body = self._envelope(self.whole_object, [choice])
        body["usage"] = usage_body(len(self.prompt_token_ids), len(token_ids), self.cached_tokens)
        return body

    def first_chunk(self) -> Body | None:
        """A chunk to send before any text (chat's role chunk); None when there is none."""
        return None

    def delta_chunk(self, text: str, token_ids: list[int]) -> Body:
        choice = self._delta_choice(text)
        if self.return_token_ids:
            choice["token_ids"] = token_ids
        return self._chunk([choice])

    def finish_chunk(self, finish_reason: str, stop_reason: str | int | None) -> Body:
        choice = self._delta_choice(None)
        choice.update(finish_reason=finish_reason, stop_reason=stop_reason)
        return self._chunk([choice])

    def usage_chunk(self, completion_tokens: int) -> Body:
        body = self._envelope(self.chunk_object, [])
        body["usage"] = usage_body(
            len(self.prompt_token_ids), completion_tokens, self.cached_tokens
        )
        return body

    def _envelope(self, obj: str, choices: list[Body]) -> Body:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _chunk(self, choices: list[Body]) -> Body:
        body = self._envelope(self.chunk_object, choices)
        if self.include_usage:
            body["usage"] = None  # as OpenAI: every chunk but the last carries a null usage
        return body

    def _whole_choice(self, text: str) -> Body:
        raise NotImplementedError

    def _delta_choice(self, text: str | None) -> Body:
        raise NotImplementedError


class CompletionBodies(ResponseBodies):
    kind: Kind = "completion"
    whole_object = "text_completion"
    chunk_object = "text_completion"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._prompt_ids_sent = False

    def _whole_choice(self, text: str) -> Body:
        choice: Body = {"index": 0, "text": text}
        if self.return_token_ids:
            choice["prompt_token_ids"] = self.prompt_token_ids
        return choice

    def _delta_choice(self, text: str | None) -> Body:
        choice: Body = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": None}
        if self.return_token_ids and not self._prompt_ids_sent:
            choice["prompt_token_ids"] = self.prompt_token_ids
            self._prompt_ids_sent = True
        return choice


class ChatBodies(ResponseBodies):
    kind: Kind = "chat"
    whole_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def whole(
        self, text: str, token_ids: list[int], finish_reason: str, stop_reason: str | int | None
    ) -> Body:
        body = super().whole(text, token_ids, finish_reason, stop_reason)
        if self.return_token_ids:
            body["prompt_token_ids"] = self.prompt_token_ids
        return body

    def first_chunk(self) -> Body:
        choice: Body = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        body = self._chunk([choice])
        if self.return_token_ids:
            body["prompt_token_ids"] = self.prompt_token_ids
        return body

    def _whole_choice(self, text: str) -> Body:
        return {"index": 0, "message": {"role": "assistant", "content": text}}

    def _delta_choice(self, text: str | None) -> Body:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
