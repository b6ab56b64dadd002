"""Measured calibration profiles: what was timed, the fitted device, and the model's error."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.planner.catalog import GpuSpec
from services.planner.errors import PlannerError
from services.planner.model_spec import ModelSpec


class Measurement(BaseModel):
    """One timed step: a prefill of `batch` prompts of `length` tokens, or a decode step of
    `batch` sequences at context `length`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    phase: Literal["prefill", "decode"]
    batch: int = Field(ge=1)
    length: int = Field(ge=1)
    seconds: float = Field(gt=0)
    predicted_s: float | None = None
    held_out: bool = False


class Profile(BaseModel):
    """A device as measured: its catalog entry (with fitted efficiency) and the evidence."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: GpuSpec
    device: str
    conditions: str = ""  # what else the machine was doing (load average), threads
    engine: str
    model: ModelSpec
    created: str
    mape: dict[str, float]
    measurements: tuple[Measurement, ...]


def load_profile(path: Path) -> Profile:
    try:
        return Profile.model_validate_json(path.read_text())
    except OSError as exc:
        raise PlannerError(f"profiles: cannot read {path}: {exc.strerror}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PlannerError(f"profiles: {path} is not a profile: {where}: {first['msg']}") from None


def save_profile(profile: Profile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.model_dump_json(indent=1) + "\n")
