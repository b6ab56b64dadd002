"""Read a topology file; every way it can fail to be a Topology becomes a problem line."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from services.cli.preflight.report import Report
from services.cli.topology import Topology


def field_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as the topology spells it: ("prefill", 0, "tp") ->
    prefill[0].tp."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _fix(error_type: str, field: str) -> str:
    if field == "(top level)":
        return "see scripts/topologies/*.yaml for complete topologies"
    if error_type == "missing":
        return f"add {field}"
    if error_type == "extra_forbidden":
        return f"remove {field} (or fix its spelling)"
    return f"correct {field}"


def read_topology(path: Path, report: Report) -> Topology | None:
    """The topology in `path`, or None with the reasons in `report`."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        report.refuse("(file)", f"topology file {path} does not exist", "give an existing file")
        return None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "(file)"
        reason = getattr(exc, "problem", None) or " ".join(str(exc).split())
        context = getattr(exc, "context", None)
        reason = f"{reason} ({context})" if context else reason
        report.refuse(at, f"not valid YAML: {reason}", "correct the YAML syntax")
        return None
    if not isinstance(raw, dict):
        report.refuse(
            "(top level)",
            f"a topology is a mapping (model, prefill, decode, ...), not {type(raw).__name__}",
            "see scripts/topologies/*.yaml for examples",
        )
        return None
    try:
        return Topology.model_validate(raw)
    except ValidationError as exc:
        for error in exc.errors():
            field = field_path(error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            report.refuse(field, message, _fix(error["type"], field))
        return None
