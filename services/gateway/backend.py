"""What the HTTP layer needs from the rest of the system (implemented over NATS in dispatch.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from proto.messages import GenerateRequest, TokenEvent


class GenerationError(Exception):
    """The system could not serve a request (no instance, instance died, timed out)."""

    def __init__(self, message: str, status: int = 503, code: str = "service_unavailable"):
        super().__init__(message)
        self.status = status
        self.code = code


class Backend(Protocol):
    model_name: str  # the name /v1/models lists and requests must use
    max_model_len: int

    def live_roles(self) -> dict[str, int]:
        """Live instance count per role (gateway, scheduler, prefill, decode, converter)."""
        ...

    def missing_roles(self) -> list[str]:
        """The roles the live system lacks to serve requests (in proto.messages.ROLES order):
        a decode instance that prefills locally stands in for prefill, and a converter is
        needed only when some live prefill -> decode pair stores KV differently."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Token events in completion order; the last one has finish_reason set.

        Raises GenerationError. If the consumer stops iterating (client gone), closing the
        iterator aborts the request everywhere and frees its KV blocks.
        """
        ...
