"""A topology file: which instances `hetserve up` starts, with which settings (read and
checked by services/cli/preflight)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from proto.layout_registry import LAYOUTS

DEMO_TOPOLOGY = Path(__file__).parent / "demo_topology.yaml"
SPEED_KEYS = ("prefill_tokens_per_s", "decode_step_s")  # what routing uses
# a `hetserve plan` pool's `speed` may be copied in whole: its other figures are accepted
PLAN_SPEED_KEYS = (*SPEED_KEYS, "decode_tokens_per_s", "batch", "requests_per_s")
# a `both` instance prefills every prompt it decodes, however long
ALWAYS = 1 << 30


class WorkerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    engine: Literal["native", "vllm"] = "native"
    # native: the layout its cache is stored in. vllm: "" (vLLM's cache decides) or the layout
    # it must turn out to be.
    kv_layout: str | None = None
    # None: one the engine and layout accept (settings.default_block_size)
    block_size: int | None = Field(None, ge=1)
    dtype: str = "float32"
    max_model_len: int = Field(0, ge=0)
    tp: int = Field(1, ge=1)
    replicas: int = Field(1, ge=1)
    num_blocks: int | None = Field(None, ge=2)  # None: settings.default_num_blocks
    device: str = ""
    # decode: prompts with at most this many uncached tokens are prefilled on this instance
    # (conditional disaggregation); `both` instances prefill every prompt themselves
    prefill_locally_below: int = Field(0, ge=0)
    # what the planner expects of it (prefill_tokens_per_s, decode_step_s), used for routing
    # until the instance has measured itself
    speed: dict[str, float | None] = {}
    # engine vllm: WorkerSettings' vllm_* options without the prefix, e.g. {kv_cache_gib: 1}
    vllm: dict[str, str | int | float | bool] = {}
    env: dict[str, str] = {}

    def model_post_init(self, _context: object) -> None:
        # What the layout, engine and model accept is checked by services/cli/preflight, field
        # by field, before `hetserve up` starts anything; the defaults wait for a known layout.
        from services.common.settings import WorkerSettings, default_block_size, default_num_blocks

        if self.kv_layout is None:
            self.kv_layout = "vllm-flash" if self.engine == "native" else ""
        known = self.engine == "vllm" or not self.kv_layout or self.kv_layout in LAYOUTS
        if self.block_size is None and known:
            self.block_size = default_block_size(self.engine, self.kv_layout)
        if self.num_blocks is None and self.block_size:
            self.num_blocks = default_num_blocks(self.block_size)
        unknown_speed = set(self.speed) - set(PLAN_SPEED_KEYS)
        if unknown_speed:
            raise ValueError(f"{self.name}: unknown speed keys {sorted(unknown_speed)}")
        if self.engine != "vllm":
            if self.vllm:
                raise ValueError(f"{self.name}: vllm options on a {self.engine} instance")
            return
        unknown = [k for k in self.vllm if f"vllm_{k}" not in WorkerSettings.model_fields]
        if unknown:
            raise ValueError(f"{self.name}: unknown vllm options {unknown}")


def worker_instance_id(spec: WorkerSpec, replica: int) -> str:
    """The instance id `hetserve up` gives replica `replica` of a prefill, decode or both
    entry."""
    return f"{spec.name}-{replica}"


class GatewaySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    port: int = 8000
    host: str = "127.0.0.1"
    replicas: int = Field(1, ge=1)


class ReplicasSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(1, ge=0)


class Topology(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    gateway: GatewaySpec = GatewaySpec()
    scheduler: ReplicasSpec = ReplicasSpec()
    converter: ReplicasSpec = ReplicasSpec()
    prefill: list[WorkerSpec] = []
    decode: list[WorkerSpec] = []
    # aggregated instances: each prefills and decodes its own requests (no KV moves)
    both: list[WorkerSpec] = []
    # how KV bytes move (settings.KVTransportSettings): frames over NATS, or payloads written
    # by the Mooncake Transfer Engine (the `[mooncake]` extra), headers over NATS; None: the
    # environment's HETSERVE_KV_TRANSPORT (default nats)
    kv_transport: Literal["nats", "mooncake"] | None = None

    def model_post_init(self, _context: object) -> None:
        if not (self.decode or self.both):
            raise ValueError("a topology needs a decode or a both instance")
        local = any(spec.prefill_locally_below for spec in self.decode)
        if not (self.prefill or self.both or local):
            raise ValueError(
                "a topology needs a prefill or a both instance (or decode instances with "
                "prefill_locally_below)"
            )
