"""Which instances may serve a request, best first. Pure functions over registry entries."""

from __future__ import annotations

import random

from proto.messages import GenerateRequest, InstanceInfo


class RoutingError(RuntimeError):
    """No instance can take the request; the message says why."""


class Busy(RuntimeError):
    """Every decode instance that could take the request is out of free blocks for now."""


def pairable(prefill: InstanceInfo, decode: InstanceInfo) -> bool:
    """Same model KV shape: the converter can bridge any layout, not a different model."""
    p, d = prefill.kv, decode.kv
    if p is None or d is None:
        return False
    return (p.num_layers, p.num_kv_heads, p.head_dim) == (d.num_layers, d.num_kv_heads, d.head_dim)


def _pinned(instances: list[InstanceInfo], pin: str, role: str) -> list[InstanceInfo]:
    if not pin:
        return instances
    chosen = [i for i in instances if i.instance_id == pin]
    if not chosen:
        raise RoutingError(f"the requested {role} instance {pin!r} is not live")
    return chosen


def rank_prefill(instances: list[InstanceInfo], request: GenerateRequest) -> list[InstanceInfo]:
    need = len(request.context_token_ids)
    usable = [
        i
        for i in _pinned(instances, request.pin_prefill, "prefill")
        if i.instance_id not in request.excluded_instances
        and i.kv is not None
        and (i.max_model_len == 0 or need <= i.max_model_len)
    ]
    return sorted(usable, key=lambda i: (i.running + i.waiting, -i.free_blocks))


def rank_decode(instances: list[InstanceInfo], request: GenerateRequest) -> list[InstanceInfo]:
    usable = [
        i
        for i in _pinned(instances, request.pin_decode, "decode")
        if i.instance_id not in request.excluded_instances and i.kv is not None
    ]
    # Most free KV first, then the shortest queue; ties broken at random, since heartbeats
    # lag and equal instances would otherwise always get the same answer.
    random.shuffle(usable)
    return sorted(usable, key=lambda i: (-i.free_blocks, i.running + i.waiting))
