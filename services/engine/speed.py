"""How fast an instance really runs: moving averages of its own step times, announced in its
heartbeat so the scheduler can route by measured capability, not by guesses."""

from __future__ import annotations

from dataclasses import dataclass

_WEIGHT = 0.2  # of the newest step: about the last ten steps count


@dataclass
class SpeedMeter:
    prefill_tokens_per_s: float = 0.0  # 0: not measured yet
    decode_step_s: float = 0.0

    def prefilled(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self.prefill_tokens_per_s = _average(self.prefill_tokens_per_s, tokens / seconds)

    def decoded(self, seconds: float) -> None:
        if seconds > 0:
            self.decode_step_s = _average(self.decode_step_s, seconds)


def _average(old: float, new: float) -> float:
    return new if old == 0 else (1 - _WEIGHT) * old + _WEIGHT * new
