"""Keyed hashing of user ids, shared by ingestion and the gateway.

Both edges must map a raw shop user id to the same pseudonym, or the gateway
would look up recommendations under a key nobody writes.
"""

from __future__ import annotations

import hashlib
import hmac


class Pseudonymizer:
    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("pseudonymization secret must not be empty")
        self._key = secret.encode()

    def __call__(self, raw_user_id: str) -> str:
        digest = hmac.new(self._key, raw_user_id.encode(), hashlib.sha256).hexdigest()
        return f"u_{digest[:32]}"
