"""A topology file: which instances `hetserve up` starts, with which settings."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from proto.layouts import get_layout

DEMO_TOPOLOGY = Path(__file__).parent / "demo_topology.yaml"


class WorkerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    engine: str = "native"
    kv_layout: str = "vllm-flash"
    block_size: int = 16
    dtype: str = "float32"
    tp: int = Field(1, ge=1)
    replicas: int = Field(1, ge=1)
    num_blocks: int = Field(1024, ge=2)
    device: str = ""
    env: dict[str, str] = {}

    def model_post_init(self, _context: object) -> None:
        spec = get_layout(self.kv_layout)
        if self.block_size not in spec.block_sizes:
            raise ValueError(f"{self.name}: layout {self.kv_layout} takes block sizes "
                             f"{spec.block_sizes}, not {self.block_size}")


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
