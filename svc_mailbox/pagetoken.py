"""Opaque page tokens: the position of the last item, bound to the user and the listing, signed
so a tampered, foreign or mismatched token is rejected with INVALID_ARGUMENT."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

from mailmesh_common.errors import InvalidInput


@dataclass(frozen=True)
class Cursor:
    ts: int
    id: str


class PageTokens:
    def __init__(self, secret: str) -> None:
        self.key = hashlib.sha256(b"mailmesh-page-token:" + secret.encode()).digest()

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.key, body, hashlib.sha256).digest()[:16]

    def encode(self, user: str, scope: str, cursor: Cursor | None) -> str:
        if cursor is None:
            return ""
        body = json.dumps([user, scope, cursor.ts, cursor.id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(self._mac(body) + body).decode().rstrip("=")

    def decode(self, token: str, user: str, scope: str) -> Cursor | None:
        if not token:
            return None
        if len(token) > 1024:
            raise InvalidInput("page_token is not valid")
        try:
            blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            mac, body = blob[:16], blob[16:]
            if not hmac.compare_digest(mac, self._mac(body)):
                raise ValueError
            t_user, t_scope, ts, last_id = json.loads(body)
            if not isinstance(ts, int) or not isinstance(last_id, str):
                raise ValueError
        except ValueError:
            raise InvalidInput("page_token is not valid") from None
        if t_user != user or t_scope != scope:
            raise InvalidInput("page_token does not belong to this listing")
        return Cursor(ts=ts, id=last_id)
