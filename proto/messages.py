"""Message models every service shares. msgpack on the wire, validated by pydantic on receipt."""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from proto.kv_descriptor import KVDescriptor

Role = Literal["gateway", "scheduler", "prefill", "decode", "converter"]
ROLES: tuple[Role, ...] = ("gateway", "scheduler", "prefill", "decode", "converter")
FinishReason = Literal["stop", "length", "abort", "error"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def pack(self) -> bytes:
        return msgpack.packb(self.model_dump(mode="python"), use_bin_type=True)

    @classmethod
    def unpack(cls: type[M], data: bytes) -> M:
        """Decode and validate; raises `MessageError` with the reason on anything malformed."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            raise MessageError(f"{cls.__name__}: not msgpack ({exc})") from exc
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise MessageError(
                f"{cls.__name__}: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}"
            ) from exc


M = TypeVar("M", bound=Message)


class MessageError(ValueError):
    """A message that does not decode or validate."""


class SamplingParams(Message):
    max_tokens: Annotated[int, Field(ge=1)] = 16
    temperature: Annotated[float, Field(ge=0.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: int = -1  # -1: off
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False


class GenerateRequest(Message):
    """Gateway -> scheduler (JetStream work queue) and, inside jobs, to the workers."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    # Tokens already produced by an earlier attempt that died: the retry continues after them.
    resumed_token_ids: list[int] = []
    attempt: int = 0
    excluded_instances: list[str] = []
    submitted_at: float = 0.0
    # Serve on these instances only (hetserve_route extension); "" lets the scheduler choose.
    pin_prefill: str = ""
    pin_decode: str = ""

    @property
    def context_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.resumed_token_ids


class InstanceInfo(Message):
    """A registry entry: refreshed by a heartbeat, considered dead after the TTL."""

    instance_id: str
    role: Role
    model: str = ""
    kv: KVDescriptor | None = None  # what the instance's cache holds (prefill, decode)
    engine: str = "native"
    tp_size: int = 1
    running: int = 0
    waiting: int = 0
    peak_running: int = 0  # largest decode batch so far
    preemptions: int = 0  # sequences a decode instance gave back for lack of KV blocks
    # prompt tokens decode took from transferred KV (vLLM: as its scheduler counted them)
    kv_loaded_tokens: int = 0
    free_blocks: int = 0
    total_blocks: int = 0
    max_model_len: int = 0
    # KV-aware routing: the prefixes this instance's cache holds (proto/prefix_hash.py, packed,
    # in blocks of kv.block_size), and how fast it is (measured; 0: not known yet)
    cached_prefixes: bytes = b""
    queued_tokens: int = 0  # prompt tokens it has yet to prefill
    prefill_tokens_per_s: float = 0.0
    decode_step_s: float = 0.0
    # a decode instance that also prefills prompts of up to this many uncached tokens itself
    # (conditional disaggregation; 0: never)
    local_prefill_max_tokens: int = 0
    heartbeat_at: float = 0.0
    started_at: float = 0.0
    pid: int = 0
    device: str = ""  # prefill, decode: where the model runs (cpu, cuda:0, ...)
    metrics_port: int = 0  # its Prometheus /metrics port; 0: none
    # its KV transfer engine's session id ("host:rpc_port", the mooncake transport); "": none
    kv_endpoint: str = ""
    # hetserve_errors_total of this process by "component/reason": since it started, and
    # within the last metrics.RECENT_ERRORS_S seconds
    errors: dict[str, int] = {}
    recent_errors: dict[str, int] = {}


class ReserveRequest(Message):
    """Scheduler -> decode: hold blocks for this many tokens before prefill starts."""

    request: GenerateRequest
    num_tokens: int  # context plus the tokens still to generate
    hold_seconds: float  # give the blocks back if no KV has arrived by then
    # a cached prefix is reused only in multiples of this many tokens (the block sizes of
    # every instance the KV may come through)
    token_align: int = 1
    local_prefill: bool = False  # no KV comes: the decode instance prefills it itself


class ReserveReply(Message):
    ok: bool
    reason: str = ""
    retry_later: bool = False  # refused only for lack of free blocks right now
    free_blocks: int = 0
    cached_tokens: int = 0  # the context's leading tokens the decode holds already


class KVRoute(Message):
    """Where a prefill worker sends its frames, and what the final receiver stores."""

    send_to: str  # instance id of the first hop (decode, or a converter)
    decode_instance: str
    decode_kv: KVDescriptor
    via_converter: bool = False
    token_offset: int = 0  # the decode holds the tokens before it: the stream starts here


class PrefillJob(Message):
    request: GenerateRequest
    route: KVRoute
    events_subject: str


class RouteEvent(Message):
    kind: Literal["route"] = "route"
    request_id: str
    prefill_instance: str
    decode_instance: str
    converter_instance: str | None = None


class TokenEvent(Message):
    """Tokens for the gateway. `index` is the position of token_ids[0] in the completion, so
    events from prefill (the first token) and decode (the rest) can be put in order."""

    kind: Literal["tokens"] = "tokens"
    request_id: str
    index: int
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    instance_id: str = ""
    cached_tokens: int | None = None  # on the first token: prompt tokens not recomputed


class ErrorEvent(Message):
    kind: Literal["error"] = "error"
    request_id: str
    message: str
    retryable: bool = True
    instance_id: str = ""
    exclude_instance: bool = True  # a retry avoids instance_id (not after a preemption)


RequestEvent = Annotated[RouteEvent | TokenEvent | ErrorEvent, Field(discriminator="kind")]
_request_event = TypeAdapter(RequestEvent)


def unpack_request_event(data: bytes) -> RouteEvent | TokenEvent | ErrorEvent:
    """Any event published on a request's events subject; MessageError if malformed."""
    try:
        return _request_event.validate_python(msgpack.unpackb(data, raw=False))
    except (ValidationError, ValueError, msgpack.ExtraData) as exc:
        raise MessageError(f"request event: {exc}") from exc


class AbortRequest(Message):
    request_id: str
    reason: str = ""


class CompletionRecord(Message):
    request_id: str
    prefill_instance: str
    decode_instance: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    finished_at: float
