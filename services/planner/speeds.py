"""What one instance of a plan's pool is expected to do, from the performance model: the
speeds a scheduler can weigh instances by (see docs/planner.md, "Instance speeds")."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from services.planner.capacity import mean_decode_batch, mean_prefill_s
from services.planner.perf_model import PerfModel
from services.planner.problem import Role
from services.planner.workload import RequestMix


@dataclass(frozen=True)
class Speed:
    """Per instance. Prefill figures are None on a decode pool and decode figures on a
    prefill pool; a colocated (`both`) pool has both."""

    prefill_tokens_per_s: float | None  # prompt tokens/s, the mix's prompts one after another
    decode_tokens_per_s: float | None  # output tokens/s while the batch decodes
    decode_step_s: float | None  # one decode round (a token for every sequence) at `batch`
    batch: float | None  # mean decode batch at the planned load (Little's law), at least 1
    requests_per_s: float  # the most requests/s the instance sustains within the SLO

    def as_dict(self) -> dict[str, Any]:
        return {k: (None if v is None else round(v, 6)) for k, v in asdict(self).items()}


def instance_speed(
    perf: PerfModel,
    mix: RequestMix,
    role: Role,
    load: float,
    rate: float,
    max_batch: int,
) -> Speed:
    """Speeds of one instance of `role` carrying `load` requests/s (its share of the pool's
    load) and sustaining at most `rate` within the SLO."""
    prefill = decode = step = batch = None
    if role != "decode":
        s = mix.prompt.points
        prefill = float(s.sum() / np.sum(perf.prefill_stage_time(s, s**2, 1)))
    if role != "prefill":
        share = 1 - load * mean_prefill_s(perf, mix) if role == "colocated" else 1.0
        mean = mean_decode_batch(perf, mix, load, max_batch, share) if load > 0 else 1.0
        batch = max(1.0, mean if mean is not None else float(max_batch))  # None: saturated
        context = mix.mean_prompt + mix.mean_output / 2
        step = float(perf.decode_round(batch, batch * context))
        decode = batch / step
    return Speed(prefill, decode, step, batch, rate)
