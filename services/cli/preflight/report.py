"""What a topology check found: problems (nothing may start), warnings, and the plan it
checked (the instances, their predicted KV descriptors, how each pair will route)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from proto.kv_descriptor import KVDescriptor

# direct: identical descriptors; converter: re-laid by the converter; unpairable: different
# model geometry; unknown: a vLLM cache layout hetserve cannot predict on this platform
Route = Literal["direct", "converter", "unpairable", "unknown"]


@dataclass(frozen=True)
class Problem:
    file: str
    field: str  # where in the topology (prefill[0].block_size), or the option (--port)
    problem: str
    fix: str

    def line(self, warning: bool = False) -> str:
        label = "warning: " if warning else ""
        return f"{self.file}: {self.field}: {label}{self.problem}; fix: {self.fix}"

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "field": self.field, "problem": self.problem, "fix": self.fix}


@dataclass
class PlannedWorker:
    """One prefill or decode entry of the topology, as it will start."""

    field: str  # prefill[0]
    role: str
    name: str
    instance_ids: list[str]
    engine: str
    tp: int
    kv: KVDescriptor | None = None  # None: not predictable, or the entry has problems

    def describe_kv(self) -> str:
        if self.kv is None:
            return "KV layout decided when vLLM allocates" if self.engine == "vllm" else "?"
        return describe_kv(self.kv)

    def to_json(self) -> dict[str, Any]:
        return {
            "field": self.field,
            "role": self.role,
            "name": self.name,
            "instances": self.instance_ids,
            "engine": self.engine,
            "tp": self.tp,
            "kv": self.kv.model_dump() if self.kv else None,
            "kv_id": self.kv.id if self.kv else None,
        }


@dataclass(frozen=True)
class PlannedPair:
    prefill: PlannedWorker
    decode: PlannedWorker
    route: Route

    def to_json(self) -> dict[str, str]:
        return {"prefill": self.prefill.name, "decode": self.decode.name, "route": self.route}


def describe_kv(kv: KVDescriptor) -> str:
    return f"{kv.layout}/{kv.block_size} {kv.dtype} tp{kv.tp_size}"


@dataclass
class Report:
    file: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    workers: list[PlannedWorker] = field(default_factory=list)
    pairs: list[PlannedPair] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def refuse(self, field_name: str, problem: str, fix: str) -> None:
        self.problems.append(Problem(self.file, field_name, problem, fix))

    def warn(self, field_name: str, problem: str, fix: str) -> None:
        self.warnings.append(Problem(self.file, field_name, problem, fix))

    def lines(self) -> list[str]:
        """Problems first, then warnings: one line each."""
        return [p.line() for p in self.problems] + [w.line(warning=True) for w in self.warnings]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "ok": self.ok,
            "problems": [p.to_json() for p in self.problems],
            "warnings": [w.to_json() for w in self.warnings],
            "workers": [w.to_json() for w in self.workers],
            "pairs": [p.to_json() for p in self.pairs],
        }
