"""Who may publish and subscribe where on the bus: one NATS user per role, least privilege.

The server enforces these (nats-server's own `authorization` users with `permissions`); a
service connects as its role's user. Each role's replies come to its own inbox prefix
(`_INBOX.<role>.`), which only that role may subscribe to, so no role reads another's
acknowledgements or reservations. Responders publish replies into `_INBOX.>`: a reply subject
is a random token its requester alone listens on.

Not separated (one user per role, not per instance): instances of one role can read each
other's subjects, and any role may write its own (or a peer's) registry key.
"""

from __future__ import annotations

from proto.messages import ROLES
from proto.subjects import Subjects

ADMIN = "admin"  # hetserve status, the start-up report, benchmarks: reads everything
BUS_USERS: tuple[str, ...] = (*ROLES, ADMIN)
# Roles that create the request queue and the completion log (the rest never touch them).
STREAM_ROLES = frozenset({"gateway", "scheduler", "decode"})
INBOX = "_INBOX"


def inbox_prefix(user: str) -> str:
    return f"{INBOX}.{user}"


def _stream_api(stream: str) -> list[str]:
    """Create (idempotent) and read one stream; consumers on it are separate."""
    return [f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.INFO.{stream}"]


def _consumer_api(stream: str) -> list[str]:
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _registry(s: Subjects) -> list[str]:
    """Every service announces itself in, and watches, the instance registry."""
    stream = f"KV_{s.registry_bucket}"
    return [
        "$JS.API.INFO",
        *_stream_api(stream),
        *_consumer_api(stream),
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$KV.{s.registry_bucket}.>",
    ]


def _streams(s: Subjects) -> list[str]:
    return [*_stream_api(s.requests_stream), *_stream_api(s.completions_stream)]


def permissions(s: Subjects, user: str) -> dict[str, dict[str, list[str]]]:
    """nats-server's `permissions` block for one role's user."""
    if user == ADMIN:
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    publish = [f"{INBOX}.>", *_registry(s)]
    subscribe = [f"{inbox_prefix(user)}.>", s.every_stats]  # each answers its own stats
    if user in STREAM_ROLES:
        publish += _streams(s)
    if user == "gateway":
        publish += [s.requests, s.aborts]
        subscribe += [s.every_request_events]
    elif user == "scheduler":
        publish += [
            *_consumer_api(s.requests_stream),
            s.every_reserve,
            s.every_prefill_jobs,
            s.every_request_events,
            s.aborts,
        ]
    elif user == "prefill":
        publish += [s.every_kv_frames, s.every_request_events]  # its job's events subject
        subscribe += [s.every_prefill_jobs]
    elif user == "decode":
        publish += [s.completions, s.every_request_events]
        subscribe += [s.every_reserve, s.every_kv_frames, s.aborts]
    elif user == "converter":
        publish += [s.every_kv_frames]
        subscribe += [s.every_kv_frames]
    else:
        raise ValueError(f"no bus user {user!r}; one of {', '.join(BUS_USERS)}")
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


def authorization(s: Subjects, passwords: dict[str, str]) -> dict:
    """nats-server's `authorization` block: a user per role, with its password."""
    return {
        "users": [
            {"user": user, "password": password, "permissions": permissions(s, user)}
            for user, password in passwords.items()
        ]
    }
