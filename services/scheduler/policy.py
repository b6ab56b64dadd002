"""Which instances may serve a request, best first. Pure functions over registry entries.

Two policies (`HETSERVE_ROUTING`):
- `kv_aware` (default): every (prefill, decode, route) the fleet allows, and local prefill on
  decode instances that offer it, ranked by estimated completion time (costs.py): cached
  prefixes on either side, queues, measured speeds, the route's transfer cost;
- `load`: the policy before it, kept as a baseline: decode by most free blocks, prefill by
  shortest queue.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from proto.messages import GenerateRequest, InstanceInfo
from services.scheduler.costs import (
    Defaults,
    Estimate,
    PrefixIndex,
    RequestPrefix,
    estimate,
    fleet_defaults,
)

Routing = Literal["kv_aware", "load"]


class RoutingError(RuntimeError):
    """No instance can take the request; the message says why."""


class NoLiveInstance(RoutingError):
    """No live instance of a role the request needs, as far as the registry knows now."""


class Busy(RuntimeError):
    """Every decode instance that could take the request is out of free blocks for now."""


@dataclass(frozen=True)
class Option:
    """One way to serve a request: `prefill` None means the decode instance prefills it."""

    decode: InstanceInfo
    prefill: InstanceInfo | None
    via_converter: bool
    estimate: Estimate | None = None
    # the decode instance's operator asked for prompts this short to be prefilled there
    # (conditional disaggregation): it goes before every estimate
    preferred: bool = False

    @property
    def local(self) -> bool:
        return self.prefill is None

    @property
    def token_align(self) -> int:
        """A cached prefix the decode reuses must be whole blocks on both sides."""
        assert self.decode.kv is not None
        sizes = [self.decode.kv.block_size]
        if self.prefill is not None and self.prefill.kv is not None:
            sizes.append(self.prefill.kv.block_size)
        return max(sizes)  # block sizes are powers of two


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


def usable_prefills(instances: list[InstanceInfo], request: GenerateRequest) -> list[InstanceInfo]:
    need = len(request.context_token_ids)
    return [
        i
        for i in _pinned(instances, request.pin_prefill, "prefill")
        if i.instance_id not in request.excluded_instances
        and i.kv is not None
        and (i.max_model_len == 0 or need <= i.max_model_len)
    ]


def usable_decodes(instances: list[InstanceInfo], request: GenerateRequest) -> list[InstanceInfo]:
    return [
        i
        for i in _pinned(instances, request.pin_decode, "decode")
        if i.instance_id not in request.excluded_instances and i.kv is not None
    ]


def _local_allowed(decode: InstanceInfo, request: GenerateRequest, cached: int) -> bool:
    if request.pin_prefill and request.pin_prefill != decode.instance_id:
        return False
    return len(request.context_token_ids) - cached <= decode.local_prefill_max_tokens


def options(
    request: GenerateRequest,
    prefills: list[InstanceInfo],
    decodes: list[InstanceInfo],
    converters: bool,
    routing: Routing,
    index: PrefixIndex,
    defaults: Defaults,
) -> list[Option]:
    """Every way to serve `request`, best first (ties broken at random: heartbeats lag, and
    equal instances would otherwise always get the same answer)."""
    prefills, decodes = usable_prefills(prefills, request), usable_decodes(decodes, request)
    defaults = fleet_defaults(defaults, prefills, decodes)
    random.shuffle(prefills)
    random.shuffle(decodes)
    prefix = RequestPrefix(request)
    found: list[Option] = []
    for decode in decodes:
        assert decode.kv is not None
        if decode.local_prefill_max_tokens and _local_allowed(
            decode, request, prefix.cached_tokens(decode, index)
        ):
            found.append(
                Option(
                    decode,
                    None,
                    False,
                    estimate(request, prefix, index, None, decode, False, defaults),
                )
            )
        for prefill in prefills:
            if not pairable(prefill, decode):
                continue
            assert prefill.kv is not None
            converted = not prefill.kv.same_kv_as(decode.kv)
            if converted and not converters:
                continue
            cost = estimate(request, prefix, index, prefill, decode, converted, defaults)
            found.append(Option(decode, prefill, converted, cost))
    if routing == "load":
        return sorted(found, key=_load_order)
    output = min(
        request.sampling.max_tokens - len(request.resumed_token_ids), defaults.output_tokens
    )
    return sorted(found, key=lambda o: o.estimate.completion_s(max(output, 1)) if o.estimate else 0)


def _load_order(option: Option) -> tuple:
    """The baseline: most free decode blocks, then the shortest decode and prefill queues."""
    d, p = option.decode, option.prefill
    prefill_queue = (p.running + p.waiting) if p is not None else 0
    return (
        -d.free_blocks,
        d.running + d.waiting,
        option.local,
        prefill_queue,
        -(p.free_blocks if p else 0),
    )


def unroutable_reason(
    request: GenerateRequest,
    prefills: list[InstanceInfo],
    decodes: list[InstanceInfo],
    converters: bool,
) -> str:
    """Why `options` found nothing, in words an operator can act on."""
    if not usable_decodes(decodes, request):
        return "no live decode instance can take this request"
    if not usable_prefills(prefills, request):
        return "no live prefill instance can take this request"
    if not converters:
        return "every prefill -> decode pair needs a converter and none is live"
    return "no prefill instance with the same model as a live decode instance"
