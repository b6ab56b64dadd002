"""Blocks a decode instance holds for requests whose KV is on its way."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from opentelemetry.trace import Span

from proto.messages import GenerateRequest


@dataclass
class Reservation:
    request: GenerateRequest
    blocks: list[int]
    deadline: float  # time.monotonic() by which more KV must have come
    span: Span
    hold_s: float = 30.0  # how long the stream may go without a frame
    pending_ranks: set[int] = field(default_factory=set)  # local ranks still receiving
    cached_tokens: int = 0  # leading context tokens its blocks hold already
    first_token: int | None = None  # from rank 0's end frame

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def progressed(self) -> None:
        """A frame came: the stream is alive, its deadline moves on (a long prompt's KV may
        take longer than one hold to arrive; a stalled stream may not)."""
        self.deadline = max(self.deadline, time.monotonic() + self.hold_s)


class Reservations:
    def __init__(self) -> None:
        self._held: dict[str, Reservation] = {}

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._held

    def add(self, reservation: Reservation) -> None:
        self._held[reservation.request_id] = reservation

    def get(self, request_id: str) -> Reservation | None:
        return self._held.get(request_id)

    def pop(self, request_id: str) -> Reservation | None:
        reservation = self._held.pop(request_id, None)
        if reservation is not None:
            reservation.span.end()
        return reservation

    def expired(self) -> list[str]:
        now = time.monotonic()
        return [rid for rid, r in self._held.items() if r.deadline < now]

    def all(self) -> list[Reservation]:
        return list(self._held.values())
