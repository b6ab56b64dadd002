"""What a plan means for the deployment: compose scale numbers and a topology file."""

from __future__ import annotations

from typing import Any

from services.planner.planner import Outcome


def scale_numbers(outcome: Outcome) -> dict[str, int]:
    """Instances per compose service (one service per role)."""
    scale: dict[str, int] = {}
    for pool in outcome.pools:
        scale[pool.role] = scale.get(pool.role, 0) + pool.instances
    return scale


def compose_command(outcome: Outcome) -> str:
    flags = " ".join(f"--scale {role}={n}" for role, n in sorted(scale_numbers(outcome).items()))
    return f"docker compose -f compose/docker-compose.yml up -d {flags}"


def topology(outcome: Outcome, model: str) -> dict[str, Any]:
    """Pools by role with their GPU type and parallelism: one compose service (or Kubernetes
    deployment) per pool when the GPU types differ."""
    return {
        "model": model,
        "services": {role: {"scale": n} for role, n in sorted(scale_numbers(outcome).items())},
        "pools": [
            {
                "name": f"{pool.role}-{pool.gpu}-tp{pool.tp}-pp{pool.pp}",
                "role": pool.role,
                "gpu": pool.gpu,
                "tp": pool.tp,
                "pp": pool.pp,
                "instances": pool.instances,
                "gpus": pool.gpus,
            }
            for pool in outcome.pools
        ],
        "kv_paths": [
            {"from": source, "to": destination, "requests_per_s": round(rate, 4)}
            for source, destination, rate in outcome.kv_paths
        ],
    }
