"""Every NATS subject, stream and bucket name hetserve uses, built from one prefix.

Two deployments can share a NATS cluster by choosing different prefixes
(`HETSERVE_PREFIX`). No other module spells a subject by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def check_token(value: str, what: str) -> str:
    """A subject token: no dots, spaces or wildcards, so ids cannot escape their subject."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} must match {_TOKEN.pattern}")
    return value


@dataclass(frozen=True)
class Subjects:
    prefix: str = "hetserve"

    def __post_init__(self) -> None:
        check_token(self.prefix, "subject prefix")

    # JetStream: the request queue (gateway -> scheduler), a work-queue stream.
    @property
    def requests_stream(self) -> str:
        return f"{self.prefix}_requests"

    @property
    def requests(self) -> str:
        return f"{self.prefix}.requests"

    # JetStream: completion records (decode -> anyone auditing), a limits stream.
    @property
    def completions_stream(self) -> str:
        return f"{self.prefix}_completions"

    @property
    def completions(self) -> str:
        return f"{self.prefix}.completions"

    # JetStream key-value bucket of live instances, one key per instance id.
    @property
    def registry_bucket(self) -> str:
        return f"{self.prefix}_instances"

    # Core NATS: everything the gateway hears about one request (route, tokens, errors).
    def request_events(self, request_id: str) -> str:
        return f"{self.prefix}.events.{check_token(request_id, 'request id')}"

    # Core NATS: a request was cancelled (client gone, stop string seen by the gateway).
    @property
    def aborts(self) -> str:
        return f"{self.prefix}.abort"

    # Core NATS request/reply to one instance: reserve KV blocks, run a prefill job, stats.
    def reserve(self, instance_id: str) -> str:
        return f"{self.prefix}.reserve.{check_token(instance_id, 'instance id')}"

    def prefill_jobs(self, instance_id: str) -> str:
        return f"{self.prefix}.prefill.{check_token(instance_id, 'instance id')}"

    def stats(self, instance_id: str) -> str:
        return f"{self.prefix}.stats.{check_token(instance_id, 'instance id')}"

    # Core NATS request/reply with a sender-side window: bulk KV frames into one tensor-
    # parallel rank of an instance (a decode worker's rank, or a converter).
    def kv_frames(self, instance_id: str, rank: int = 0) -> str:
        return f"{self.prefix}.kv.{check_token(instance_id, 'instance id')}.{int(rank)}"

    # Wildcards over the per-request and per-instance families, for the bus's permissions.
    @property
    def every_request_events(self) -> str:
        return f"{self.prefix}.events.*"

    @property
    def every_reserve(self) -> str:
        return f"{self.prefix}.reserve.*"

    @property
    def every_prefill_jobs(self) -> str:
        return f"{self.prefix}.prefill.*"

    @property
    def every_stats(self) -> str:
        return f"{self.prefix}.stats.*"

    @property
    def every_kv_frames(self) -> str:
        return f"{self.prefix}.kv.*.*"
