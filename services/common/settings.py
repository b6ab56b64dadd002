"""Settings of every service: `HETSERVE_*` environment variables (or a .env file)."""

from __future__ import annotations

import os
import socket
import uuid

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    from proto.layouts import get_layout

    sizes = sorted(get_layout(kv_layout or "vllm-flash").block_sizes)
    return next((b for b in sizes if b >= NATIVE_BLOCK_SIZE), sizes[-1])


def default_num_blocks(block_size: int) -> int:
    return max(2, -(-DEFAULT_CACHE_TOKENS // block_size))


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HETSERVE_", env_file=".env", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
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


class WorkerSettings(CommonSettings):
    """Prefill and decode instances."""

    model: str = "models/smollm2-135m-instruct"
    engine: str = "native"  # native | vllm
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
    max_attempts: int = Field(3, ge=1)


class SchedulerSettings(CommonSettings):
    # while every decode instance is full, a request waits this long for blocks to free
    queue_timeout_s: float = Field(60.0, gt=0)
    reserve_timeout_s: float = Field(5.0, gt=0)
    reserve_hold_s: float = Field(30.0, gt=0)
    max_in_flight: int = Field(256, ge=1)


class ConverterSettings(CommonSettings):
    convert_threads: int = Field(1, ge=1)
