"""What this scheduler has placed on instances since their last heartbeat.

Heartbeats come once a second; requests can arrive many times a second. Without this, every
request between two heartbeats sees the same loads and goes to the same instance. A
placement counts until the instance's next heartbeat, which reports it itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.messages import InstanceInfo


@dataclass
class _Since:
    heartbeat_at: float  # the heartbeat the placements came after
    sequences: int = 0  # decode: reservations made
    tokens: int = 0  # prefill: prompt tokens sent


class RecentPlacements:
    def __init__(self) -> None:
        self._since: dict[str, _Since] = {}

    def _entry(self, info: InstanceInfo) -> _Since:
        entry = self._since.get(info.instance_id)
        if entry is None or entry.heartbeat_at != info.heartbeat_at:
            entry = self._since[info.instance_id] = _Since(info.heartbeat_at)
        return entry

    def placed(self, info: InstanceInfo, sequences: int = 0, tokens: int = 0) -> None:
        entry = self._entry(info)
        entry.sequences += sequences
        entry.tokens += tokens

    def applied(self, info: InstanceInfo) -> InstanceInfo:
        """`info` with the placements made since its heartbeat added to its load."""
        entry = self._since.get(info.instance_id)
        if entry is None or entry.heartbeat_at != info.heartbeat_at:
            return info
        return info.model_copy(
            update={
                "waiting": info.waiting + entry.sequences,
                "queued_tokens": info.queued_tokens + entry.tokens,
            }
        )

    def forget(self, live: set[str]) -> None:
        for instance in [i for i in self._since if i not in live]:
            del self._since[instance]
