"""What a plan means for the deployment: compose scale numbers and a topology file.

Pool roles as a deployment names them: `prefill`, `decode`, or `both` (a colocated instance
that runs prefill and decode, as an engine without P/D does)."""

from __future__ import annotations

from typing import Any

from services.planner.outcome import Outcome

ROLE_NAMES = {"prefill": "prefill", "decode": "decode", "colocated": "both"}
COMPOSE_SERVICES = ("prefill", "decode", "both")  # `both` runs under --profile aggregated


def role_name(role: str) -> str:
    return ROLE_NAMES.get(role, role)


def scale_numbers(outcome: Outcome) -> dict[str, int]:
    """Instances per role (one compose service per role)."""
    scale: dict[str, int] = {}
    for pool in outcome.pools:
        name = role_name(pool.role)
        scale[name] = scale.get(name, 0) + pool.instances
    return scale


def compose_command(outcome: Outcome) -> str:
    """The compose line: every role's scale (aggregated `both` workers need their profile,
    and prefill goes to 0 when a plan has none)."""
    scale = scale_numbers(outcome)
    if "both" in scale:
        scale.setdefault("prefill", 0)
        scale.setdefault("decode", 0)
    flags = " ".join(
        f"--scale {role}={scale[role]}" for role in sorted(scale) if role in COMPOSE_SERVICES
    )
    profile = "--profile aggregated " if "both" in scale else ""
    return f"docker compose -f compose/docker-compose.yml {profile}up -d {flags}".rstrip()


def topology(outcome: Outcome, model: str) -> dict[str, Any]:
    """Pools by role with their GPU type, parallelism and expected speeds per instance: one
    compose service (or Kubernetes deployment) per pool when the GPU types differ."""
    return {
        "model": model,
        "services": {role: {"scale": n} for role, n in sorted(scale_numbers(outcome).items())},
        "pools": [
            {
                "name": f"{role_name(pool.role)}-{pool.gpu}-tp{pool.tp}-pp{pool.pp}",
                "role": role_name(pool.role),
                "gpu": pool.gpu,
                "tp": pool.tp,
                "pp": pool.pp,
                "instances": pool.instances,
                "gpus": pool.gpus,
                "speed": pool.speed.as_dict(),
            }
            for pool in outcome.pools
        ],
        "kv_paths": [
            {"from": source, "to": destination, "requests_per_s": round(rate, 4)}
            for source, destination, rate in outcome.kv_paths
        ],
    }
