"""A topology file: which instances `hetserve up` starts, with which settings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEMO_TOPOLOGY = Path(__file__).parent / "demo_topology.yaml"


class WorkerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    engine: Literal["native", "vllm"] = "native"
    # native: the layout its cache is stored in. vllm: "" (vLLM's cache decides) or the layout
    # it must turn out to be.
    kv_layout: str | None = None
    block_size: int = 16
    dtype: str = "float32"
    max_model_len: int = Field(0, ge=0)
    tp: int = Field(1, ge=1)
    replicas: int = Field(1, ge=1)
    num_blocks: int = Field(1024, ge=2)
    device: str = ""
    # engine vllm: WorkerSettings' vllm_* options without the prefix, e.g. {kv_cache_gib: 1}
    vllm: dict[str, str | int | float | bool] = {}
    env: dict[str, str] = {}

    def model_post_init(self, _context: object) -> None:
        # What the layout, engine and model accept is checked by services/cli/preflight, field
        # by field, before `hetserve up` starts anything.
        if self.kv_layout is None:
            self.kv_layout = "vllm-flash" if self.engine == "native" else ""
        if self.engine != "vllm":
            if self.vllm:
                raise ValueError(f"{self.name}: vllm options on a {self.engine} instance")
            return
        from services.common.settings import WorkerSettings

        unknown = [k for k in self.vllm if f"vllm_{k}" not in WorkerSettings.model_fields]
        if unknown:
            raise ValueError(f"{self.name}: unknown vllm options {unknown}")


def worker_instance_id(spec: WorkerSpec, replica: int) -> str:
    """The instance id `hetserve up` gives replica `replica` of a prefill or decode entry."""
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
    prefill: list[WorkerSpec]
    decode: list[WorkerSpec]


def load_topology(path: Path) -> Topology:
    try:
        raw = yaml.safe_load(path.read_text())
        return Topology.model_validate(raw)
    except FileNotFoundError:
        raise ValueError(f"topology file {path} does not exist") from None
    except (yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"topology {path} is invalid: {exc}") from None
