"""When `hetserve up` restarts an instance that died, as compose's `restart:` and
Kubernetes do: after an exponential backoff (capped), and never again once it has died
quickly too many times in a row (a crash loop is a fault to report, not to repeat)."""

from __future__ import annotations

from dataclasses import dataclass, field

BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 30.0
QUICK_DEATH_S = 10.0  # a process that lived less than this died quickly
MAX_QUICK_DEATHS = 5


@dataclass
class RestartPolicy:
    first_s: float = BACKOFF_FIRST_S
    cap_s: float = BACKOFF_CAP_S
    quick_s: float = QUICK_DEATH_S
    max_quick: int = MAX_QUICK_DEATHS
    quick_deaths: dict[str, int] = field(default_factory=dict)

    def after_death(self, name: str, lived_s: float) -> float | None:
        """Seconds to wait before restarting `name`, which lived `lived_s`; None: give up."""
        quick = self.quick_deaths.get(name, 0) + 1 if lived_s < self.quick_s else 0
        self.quick_deaths[name] = quick
        if quick >= self.max_quick:
            return None
        return min(self.first_s * 2**quick, self.cap_s)
