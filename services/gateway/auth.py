"""API keys, as vLLM does them: `Authorization: Bearer <key>` on every request but the probes'.

Keys are compared in constant time (over their SHA-256 digests, so neither a key's content nor
its length shows in the timing), every configured key is compared on every request (which key
matched does not show either), and no key is ever logged or put in a response.
"""

from __future__ import annotations

import hashlib
import hmac

# Probes and scrapers reach these without a key.
OPEN_PATHS = frozenset({"/health", "/metrics"})


class Unauthorized(Exception):
    """No key, or not one of ours; answered 401 with OpenAI's error body."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class ApiKeys:
    """The configured keys; `tenant` names the key a request presented without revealing it."""

    def __init__(self, keys: str):
        """`keys`: one key, or several separated by commas; empty: authentication is off."""
        self._digests = [_digest(k.strip()) for k in keys.split(",") if k.strip()]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def tenant(self, authorization: str | None) -> str:
        """The presented key's tenant ("key-<index>" in the configured list). Raises
        Unauthorized when the header is missing, malformed or holds no configured key."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "Missing API key: send it as the header 'Authorization: Bearer <key>'"
            )
        presented = _digest(token.strip())
        matched = -1
        for index, digest in enumerate(self._digests):
            if hmac.compare_digest(presented, digest):  # every key compared: no early exit
                matched = index
        if matched < 0:
            raise Unauthorized("Incorrect API key provided")
        return f"key-{matched}"
