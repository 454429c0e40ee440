"""REST bearer tokens: opaque random strings, kept server-side (sha256 of the token only) in the
gateway's KV store so that every gateway replica shares them; revocable and expiring.

Key layout (under the `gateway` subspace): ("tok", sha256 hex) -> JSON {user_id, email, expires_at}.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

from mailmesh_common import telemetry
from mailmesh_common.kv import Database, Subspace, Transaction

SPACE = Subspace(("gateway",))
_TOKENS = SPACE["tok"]
# upper bound on what a client may present: longer strings are not ours and are not hashed
MAX_TOKEN_CHARS = 256


@dataclass(frozen=True)
class TokenInfo:
    """Who a valid token belongs to and when it stops working (epoch seconds)."""

    user_id: str
    email: str
    expires_at: float


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Issues, looks up and revokes bearer tokens."""

    def __init__(self, db: Database, ttl_s: float) -> None:
        self.db = db
        self.ttl_s = ttl_s

    async def issue(self, user_id: str, email: str) -> tuple[str, float]:
        """A new token for the user and its expiry time (epoch seconds)."""
        with telemetry.tracer().start_as_current_span("gateway.token.issue"):
            token = secrets.token_urlsafe(32)
            expires_at = time.time() + self.ttl_s
            value = json.dumps({"user_id": user_id, "email": email, "expires_at": expires_at}).encode()
            key = _TOKENS.pack((_digest(token),))

            def put(tr: Transaction) -> None:
                tr.set(key, value)

            await self.db.run(put)
            return token, expires_at

    async def lookup(self, token: str) -> TokenInfo | None:
        """The token's owner, or None when the token is unknown, revoked or expired."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        key = _TOKENS.pack((_digest(token),))
        raw = await self.db.run(lambda tr: tr.get(key), readonly=True)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            info = TokenInfo(str(data["user_id"]), str(data["email"]), float(data["expires_at"]))
        except (ValueError, KeyError, TypeError):
            return None
        if info.expires_at <= time.time():
            await self.revoke(token)
            return None
        return info

    async def revoke(self, token: str) -> None:
        """Forgets the token (idempotent)."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return
        key = _TOKENS.pack((_digest(token),))

        def clear(tr: Transaction) -> None:
            tr.clear(key)

        with telemetry.tracer().start_as_current_span("gateway.token.revoke"):
            await self.db.run(clear)

    async def sweep(self, limit: int = 1000) -> int:
        """Removes up to `limit` expired tokens; returns how many it removed."""
        now = time.time()
        begin, end = _TOKENS.range()

        def fn(tr: Transaction) -> int:
            removed = 0
            for key, value in tr.get_range(begin, end, limit=limit):
                try:
                    expired = float(json.loads(value)["expires_at"]) <= now
                except (ValueError, KeyError, TypeError):
                    expired = True
                if expired:
                    tr.clear(key)
                    removed += 1
            return removed

        return await self.db.run(fn)
