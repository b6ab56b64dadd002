"""OpenAI request models, and the checks that turn a request into generation inputs.

Parsing uses strict JSON types (the string "5" is not a number). Fields this server does not
implement are refused with a 400 that names them, unless they hold their "off" value, so a
client never gets silently different behaviour from what it asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from proto.messages import SamplingParams
from services.hf.tokenizer import ChatTemplateError, Tokenizer


class InvalidRequest(Exception):
    """A request the server refuses; answered with OpenAI's error body and this status."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


# Fields this server does not implement -> the values that mean "not used". OpenAI's fields
# first, then vLLM's extensions that would change the output.
_UNSUPPORTED_COMMON: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "repetition_penalty": (None, 1),
    "min_p": (None, 0),
    "min_tokens": (None, 0),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "prompt_logprobs": (None,),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "logits_processors": (None,),
    "structured_outputs": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
}
_SHOWN_VALUE_CHARS = 80  # an unsupported field's value, as the error message quotes it


def _one_prompt(value: Any) -> Any:
    """A string or a list of token ids; OpenAI's batch form is accepted with one prompt."""
    if isinstance(value, list) and value and all(isinstance(v, str | list) for v in value):
        if len(value) > 1:
            raise ValueError(
                f"{len(value)} prompts were sent; batched prompts are not supported, "
                "send one prompt per request"
            )
        value = value[0]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(type(v) is int for v in value):
        return value
    raise ValueError("must be a string or a list of token ids")


def _text_content(value: Any) -> Any:
    """Message content as one string; text parts are joined with newlines (as vLLM does)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise ValueError('only text parts ({"type": "text", "text": "..."}) are supported')
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError("must be a string or a list of text parts")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class RoutePin(_Strict):
    """hetserve extension: serve on these instances (ids as in the registry), e.g. to test
    or debug one prefill/decode pair."""

    prefill_instance: str = ""
    decode_instance: str = ""


class _GenerationRequest(_Strict):
    """Fields both endpoints share. None stands for "not given" (clients send explicit nulls)."""

    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = _UNSUPPORTED_COMMON

    model: str | None = None
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, lt=2**63)  # vLLM extension; -1 or 0: off
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: list[str] = []
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool | None = None  # vLLM extension
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    return_token_ids: bool | None = None  # vLLM extension
    hetserve_route: RoutePin | None = None  # hetserve extension

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and "" in value:
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, value: int | None) -> int | None:
        if value is not None and value < -1:
            raise ValueError("must be -1 or 0 (no limit) or at least 1")
        return value


class CompletionRequest(_GenerationRequest):
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_UNSUPPORTED_COMMON,
        "echo": (None, False),
        "logprobs": (None,),
        "suffix": (None, ""),
        "best_of": (None, 1),
    }

    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default; null: fill the context

    _prompt = field_validator("prompt", mode="before")(_one_prompt)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str

    _content = field_validator("content", mode="before")(_text_content)


class ChatRequest(_GenerationRequest):
    unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {
        **_UNSUPPORTED_COMMON,
        "logprobs": (None, False),
        "top_logprobs": (None, 0),
        "tools": (None, []),
        "functions": (None, []),
        "tool_choice": (None, "none", "auto"),
        "function_call": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}),
        "audio": (None,),
        "modalities": (None, ["text"]),
        "reasoning_effort": (None,),
        "verbosity": (None,),
        "web_search_options": (None,),
        "store": (None, False),  # nothing is stored for later retrieval
        "service_tier": (None, "auto", "default"),
        "echo": (None, False),
        "add_generation_prompt": (None, True),
        "continue_final_message": (None, False),
        "chat_template": (None,),
        "chat_template_kwargs": (None, {}),
        "documents": (None,),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


R = TypeVar("R", bound=_GenerationRequest)


def parse_request(raw: bytes, model: type[R]) -> R:
    """Parse a request body; raises InvalidRequest naming the offending parameter."""
    try:
        data = json.loads(raw)
    except ValueError as exc:  # also bad UTF-8, and integers of more than 4300 digits
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("The request body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    if (where := _lone_surrogate(data)) is not None:
        raise InvalidRequest(
            f"Invalid value for '{where}': a \\u escape encodes half of a UTF-16 surrogate "
            "pair, which is not a character",
            param=where,
        )
    for name, allowed in model.unsupported.items():
        if name in data and data[name] not in allowed:
            value = json.dumps(data[name], ensure_ascii=False)
            if len(value) > _SHOWN_VALUE_CHARS:
                value = value[: _SHOWN_VALUE_CHARS - 3] + "..."
            raise InvalidRequest(f"{name}={value} is not supported by this server", param=name)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc) from None


def _lone_surrogate(data: dict[str, Any]) -> str | None:
    """Where the JSON holds a string that is not Unicode text (a lone surrogate, which JSON's
    \\u escapes can spell): it could be neither tokenised nor sent on in UTF-8."""
    stack: list[tuple[str, Any]] = [(key, value) for key, value in data.items()]
    while stack:
        where, value = stack.pop()
        texts = [where, value] if isinstance(value, str) else [where]
        if any(not text.isascii() and _has_surrogate(text) for text in texts):
            return where
        if isinstance(value, dict):
            stack += [(f"{where}.{key}", item) for key, item in value.items()]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _from_validation_error(exc: ValidationError) -> InvalidRequest:
    error = exc.errors(include_url=False)[0]
    param = ""
    for part in error["loc"]:
        param += f"[{part}]" if isinstance(part, int) else f".{part}" if param else str(part)
    if error["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'", param=param)
    message = error["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"Invalid value for '{param}': {message}", param=param or None)


@dataclass(frozen=True)
class ServedModel:
    name: str
    max_model_len: int
    vocab_size: int


@dataclass(frozen=True)
class Prepared:
    """A valid request, ready to become a GenerateRequest and a response."""

    prompt_token_ids: list[int]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    return_token_ids: bool
    route: RoutePin | None = None


def prepare_completion(
    request: CompletionRequest, tokenizer: Tokenizer, served: ServedModel
) -> Prepared:
    _check_common(request, served)
    if isinstance(request.prompt, str):
        prompt_ids = tokenizer.encode(request.prompt)
    else:
        prompt_ids = request.prompt
        _check_token_ids(prompt_ids, served.vocab_size, "prompt")
    max_tokens = _fit_context(prompt_ids, request.max_tokens, served, "prompt", "max_tokens")
    return _prepared(request, prompt_ids, max_tokens)


def prepare_chat(request: ChatRequest, tokenizer: Tokenizer, served: ServedModel) -> Prepared:
    _check_common(request, served)
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except ChatTemplateError as exc:  # e.g. "roles must alternate", or no template at all
        raise InvalidRequest(
            f"The chat template rejected the messages: {exc}", "messages"
        ) from None
    # The template already holds BOS and the other special tokens.
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    if request.max_completion_tokens is not None:
        max_param, requested = "max_completion_tokens", request.max_completion_tokens
    else:
        max_param, requested = "max_tokens", request.max_tokens
    max_tokens = _fit_context(prompt_ids, requested, served, "messages", max_param)
    return _prepared(request, prompt_ids, max_tokens)


def _check_common(request: _GenerationRequest, served: ServedModel) -> None:
    if request.model is not None and request.model != served.name:
        raise InvalidRequest(
            f"The model '{request.model}' does not exist; this server serves '{served.name}'",
            param="model",
            status=404,
            code="model_not_found",
        )
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
    _check_token_ids(request.stop_token_ids or [], served.vocab_size, "stop_token_ids")


def _check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    for position, token_id in enumerate(token_ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidRequest(
                f"Token id {token_id} at {param}[{position}] is outside the vocabulary "
                f"(valid ids are 0 to {vocab_size - 1})",
                param=param,
            )


def _fit_context(
    prompt_ids: list[int],
    requested: int | None,
    served: ServedModel,
    prompt_param: str,
    max_param: str,
) -> int:
    """max_tokens after checking prompt + completion fit the context; None fills the context."""
    prompt_len, limit = len(prompt_ids), served.max_model_len
    if prompt_len == 0:
        raise InvalidRequest("The prompt is empty", param=prompt_param)
    if prompt_len >= limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens, but the prompt alone is "
            f"{prompt_len} tokens, which leaves no room for a completion",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return limit - prompt_len
    if prompt_len + requested > limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens, but "
            f"{prompt_len + requested} tokens were requested ({prompt_len} in the prompt, "
            f"{requested} for the completion); reduce the prompt or {max_param}",
            param=max_param,
            code="context_length_exceeded",
        )
    return requested


def _prepared(request: _GenerationRequest, prompt_ids: list[int], max_tokens: int) -> Prepared:
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=-1 if request.top_k in (None, 0) else request.top_k,
        seed=request.seed,
        stop=request.stop,
        stop_token_ids=request.stop_token_ids or [],
        ignore_eos=bool(request.ignore_eos),
    )
    options = request.stream_options
    return Prepared(
        prompt_token_ids=prompt_ids,
        sampling=sampling,
        stream=bool(request.stream),
        include_usage=bool(options and options.include_usage),
        return_token_ids=bool(request.return_token_ids),
        route=request.hetserve_route,
    )
