"""The embedded server's users: a fresh password per role at every `hetserve up`, and each
role's NATS URL (with its credentials) in `<state dir>/nats/<role>.url`, readable by the owner
only, for `hetserve status` and anything else the operator points at the bus."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from services.common.bus_permissions import ADMIN, BUS_USERS

DEFAULT_STATE_DIR = Path(".hetserve")


def url_file(state_dir: Path, user: str) -> Path:
    return state_dir / "nats" / f"{user}.url"


def with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class BusUsers:
    passwords: dict[str, str] = field(
        default_factory=lambda: {user: secrets.token_urlsafe(24) for user in BUS_USERS}
    )

    def url(self, server_url: str, user: str) -> str:
        return with_credentials(server_url, user, self.passwords[user])

    def write(self, state_dir: Path, server_url: str) -> None:
        """One file per role, mode 0600 in a 0700 directory: the only copy outside memory."""
        folder = url_file(state_dir, ADMIN).parent
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        for user in self.passwords:
            path = url_file(state_dir, user)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(self.url(server_url, user) + "\n")
            path.chmod(0o600)  # an older file kept its mode through O_TRUNC


def read_url(state_dir: Path, user: str = ADMIN) -> str | None:
    path = url_file(state_dir, user)
    return path.read_text().strip() if path.exists() else None
