"""Settings of every service: `HETSERVE_*` environment variables (or a .env file)."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from proto.layout_registry import get_layout
from proto.subjects import Subjects


def default_instance_id(role: str) -> str:
    """Unique per process and per container (hostname), safe as a subject token."""
    host = "".join(c if c.isalnum() else "-" for c in socket.gethostname())[:63]
    return f"{role}-{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# A worker given no block size gets one its engine and layout accept: vLLM's CPU attention
# takes multiples of 32 only (its CUDA backends take 32 too); a native instance gets 16 when
# its layout takes it, else the layout's smallest size above (ascend: 128).
VLLM_BLOCK_SIZE = 32
NATIVE_BLOCK_SIZE = 16
# A worker given no block count gets blocks for this many tokens, whatever its block size.
DEFAULT_CACHE_TOKENS = 16384


def default_block_size(engine: str, kv_layout: str) -> int:
    if engine == "vllm":
        return VLLM_BLOCK_SIZE
    sizes = sorted(get_layout(kv_layout or "vllm-flash").block_sizes)
    return next((b for b in sizes if b >= NATIVE_BLOCK_SIZE), sizes[-1])


def default_num_blocks(block_size: int) -> int:
    return max(2, -(-DEFAULT_CACHE_TOKENS // block_size))


class KVTransportSettings(BaseSettings):
    """How KV bytes move between instances (services/kv): `nats`, frames over NATS (the
    default, nothing to install), or `mooncake`, frame headers over NATS and payloads written
    by the Mooncake Transfer Engine into memory the receiver registered (the `[mooncake]`
    extra). Every instance of a deployment should use the same one (a mooncake sender falls
    back to inline payloads for a receiver that leases it no staging slots)."""

    model_config = SettingsConfigDict(env_prefix="HETSERVE_", env_file=".env", extra="ignore")

    kv_transport: Literal["nats", "mooncake"] = "nats"
    mooncake_protocol: str = "tcp"  # the engine's transport: tcp, rdma, ...
    mooncake_devices: str = ""  # e.g. "mlx5_0,mlx5_1" for rdma ("": none)
    mooncake_host: str = ""  # the address peers write to ("": this host name's address)
    # a receiver's registered staging memory, cut into slots of one frame: the bound on what
    # streams in flight may hold (a stream that finds no free slot gets its payloads inline)
    mooncake_staging_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    # fault injection for tests: a sender's stream writes outside the receiver's memory after
    # this many payloads (the engine refuses the write); -1: never
    mooncake_fail_write_after: int = -1


class CommonSettings(KVTransportSettings):
    model_config = SettingsConfigDict(env_prefix="HETSERVE_", env_file=".env", extra="ignore")

    # The server, and this service's credentials on it: in the URL (nats://user:password@host)
    # or apart; or a .creds file (JWT + nkey). TLS for a remote server: a CA, and a client
    # certificate where the server asks for one.
    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str = ""
    nats_password: SecretStr = SecretStr("")
    nats_creds: str = ""
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    prefix: str = "hetserve"
    instance_id: str = ""
    log_level: str = "INFO"
    heartbeat_interval_s: float = Field(1.0, gt=0)
    instance_ttl_s: float = Field(4.0, gt=0)
    # KV frames: at most this many bytes each (below the server's max_payload), and at most
    # `kv_window` unacknowledged frames per stream (credit-based flow control).
    max_frame_bytes: int = Field(4 * 1024 * 1024, ge=4096)
    kv_window: int = Field(4, ge=1)
    kv_ack_timeout_s: float = Field(10.0, gt=0)
    metrics_port: int = 0  # 0: no Prometheus endpoint
    # replicas of hetserve's JetStream streams and registry bucket (3 on a 3-node NATS cluster)
    jetstream_replicas: int = Field(1, ge=1, le=5)

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.prefix)

    @property
    def nats_servers(self) -> list[str]:
        """The servers of `nats_url`: one URL, or a cluster's, comma-separated (the client
        connects to one and moves to another when it goes)."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]

    @property
    def nats_url_public(self) -> str:
        """The servers' URLs without credentials: the one to log or print."""
        return ",".join(redact_url(url) for url in self.nats_servers)

    @property
    def nats_username(self) -> str:
        return self.nats_user or (urlsplit(self.nats_servers[0]).username or "")


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


class WorkerSettings(CommonSettings):
    """Prefill and decode instances."""

    model: str = "models/smollm2-135m-instruct"
    engine: Literal["native", "vllm"] = "native"
    # The cache layout of a native instance ("": vllm-flash); a vLLM instance reads its own
    # from vLLM's real cache tensors ("" accepts it, a name must match it).
    kv_layout: str = ""
    block_size: int = Field(0, ge=0)  # 0: default_block_size(engine, kv_layout)
    kv_dtype: str = "float32"
    num_blocks: int = Field(0, ge=0)  # 0: default_num_blocks(block_size); else at least 2
    device: str = ""  # "" picks cuda when present, else cpu
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    torch_threads: int = 0  # 0: torch's default
    max_batch_size: int = Field(64, ge=1)
    # native engine: prompt tokens computed in one prefill step (longer prompts are chunked)
    max_batched_tokens: int = Field(2048, ge=1)
    prefix_caching: bool = True  # native engine: reuse cached KV of a prompt's prefix
    # decode: prompts with at most this many uncached tokens are prefilled here, not sent
    # through a prefill instance (conditional disaggregation; 0: never)
    prefill_locally_below: int = Field(0, ge=0)
    # what the planner expects of this instance, announced until it has measured itself
    expected_prefill_tokens_per_s: float = Field(0.0, ge=0)
    expected_decode_step_s: float = Field(0.0, ge=0)
    # benchmarks of a slow instance: every native engine step takes this much longer
    step_delay_s: float = Field(0.0, ge=0)
    # tensor parallelism: one process per rank, all with the same instance id
    tp_size: int = Field(1, ge=1)
    tp_rank: int = Field(0, ge=0)
    tp_master_addr: str = "127.0.0.1"
    tp_master_port: int = 29500
    reserve_hold_s: float = Field(30.0, gt=0)
    # decode: blocks held at admission cover the prompt plus this many output tokens
    reserve_ahead_tokens: int = Field(256, ge=1)
    # engine vllm: vLLM's own options (block_size, kv_dtype as the model dtype, max_model_len
    # and tp_size above apply too). num_blocks sizes the decode side's shared-memory staging.
    # None: room for one max_model_len sequence, at least 0.25 GiB (vllm_engine.py);
    # 0: vLLM sizes it by gpu_memory_utilization
    vllm_kv_cache_gib: float | None = Field(None, ge=0)
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    vllm_enforce_eager: bool = True  # no CUDA graphs: layer-wise KV hooks run every layer
    vllm_max_num_batched_tokens: int = 0  # 0: vLLM's default (chunked prefill above it)
    vllm_enable_prefix_caching: bool = True  # prefill only; decode loads every prompt token

    @model_validator(mode="after")
    def _engine_defaults(self) -> WorkerSettings:
        if self.engine != "vllm" and not self.kv_layout:
            self.kv_layout = "vllm-flash"
        if not self.block_size:
            self.block_size = default_block_size(self.engine, self.kv_layout)
        if not self.num_blocks:
            self.num_blocks = default_num_blocks(self.block_size)
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2, not {self.num_blocks}")
        return self


class GatewaySettings(CommonSettings):
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "models/smollm2-135m-instruct"
    served_model_name: str = ""  # "" : the model directory's name
    first_token_timeout_s: float = Field(120.0, gt=0)
    token_timeout_s: float = Field(60.0, gt=0)
    # a token event missing while later ones have come (core NATS lost it): retry (resuming
    # from the tokens delivered) once the gap has lasted this long, not after token_timeout_s
    token_gap_timeout_s: float = Field(2.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    # API keys: one, or several comma-separated; empty: no authentication. Every request but
    # /health and /metrics then needs `Authorization: Bearer <key>`.
    api_key: SecretStr = SecretStr("")
    # Admission: requests submitted to the system at once, and requests waiting in the gateway
    # for one of those slots (beyond both: 429 at once); a waiting request that gets no slot
    # within max_queue_wait_s is answered 503. Both carry Retry-After.
    max_inflight_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(512, ge=0)
    max_queue_wait_s: float = Field(30.0, gt=0)
    # With API keys: the most requests one key may have in the gateway (in flight + queued);
    # 0: no per-key limit
    max_requests_per_key: int = Field(0, ge=0)
    max_request_body_bytes: int = Field(1024 * 1024, ge=1024)  # larger bodies: 413


class SchedulerSettings(CommonSettings):
    # while every decode instance is full, a request waits this long for blocks to free
    queue_timeout_s: float = Field(60.0, gt=0)
    reserve_timeout_s: float = Field(5.0, gt=0)
    reserve_hold_s: float = Field(30.0, gt=0)
    # JetStream redelivers a request whose scheduler died this long after its last sign of
    # life; a live scheduler sends one (in_progress) every third of it while it places one
    request_ack_wait_s: float = Field(5.0, ge=1.0)
    max_in_flight: int = Field(256, ge=1)
    # kv_aware: by estimated completion (cached prefixes, queues, measured speeds, route
    # costs); load: most free decode blocks, shortest prefill queue (the older policy)
    routing: Literal["kv_aware", "load"] = "kv_aware"
    # what the estimates assume until instances have measured themselves
    default_prefill_tokens_per_s: float = Field(2000.0, gt=0)
    default_decode_step_s: float = Field(0.02, gt=0)
    kv_bytes_per_s: float = Field(2.5e8, gt=0)
    converter_bytes_per_s: float = Field(1.2e8, gt=0)


class ConverterSettings(CommonSettings):
    convert_threads: int = Field(1, ge=1)
