"""Opaque, signed page tokens: the one implementation every listing of the mesh uses.

A token is `base64url(mac || body)`, where body is compact JSON naming the user the listing
belongs to, the listing's scope (what was listed: a label and its filters, a digest of a search
query...) and the position to continue from, and mac is an HMAC-SHA256 (first 16 bytes) keyed by
the mesh secret and the token's purpose. So a token that was altered, issued with another secret,
issued for another purpose (a search token given to the mailbox), or that belongs to another
user or listing, is rejected with INVALID_ARGUMENT, and its contents never reach a query
unchecked. Tokens are bounded (MAX_TOKEN_CHARS).

`SignedTokens` seals and opens any JSON payload; `PageTokens` is the common (time, id) cursor of
newest-first listings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from mailmesh_common.errors import InvalidInput

MAX_TOKEN_CHARS = 8192
MAC_BYTES = 16
INVALID = "page_token is not valid"
FOREIGN = "page_token does not belong to this listing"


class SignedTokens:
    """Seals a JSON payload into a token bound to (user, scope), and opens it again."""

    def __init__(self, secret: str, purpose: str, *, max_chars: int = MAX_TOKEN_CHARS) -> None:
        if not purpose or "\0" in purpose:
            raise ValueError("a token purpose is a non-empty string without NUL")
        self.key = hashlib.sha256(b"mailmesh-page-token\0" + purpose.encode() + b"\0" + secret.encode()).digest()
        self.max_chars = max_chars

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.key, body, hashlib.sha256).digest()[:MAC_BYTES]

    def seal(self, user: str, scope: str, payload: Any) -> str:
        body = json.dumps([user, scope, payload], separators=(",", ":"), ensure_ascii=True).encode()
        token = base64.urlsafe_b64encode(self._mac(body) + body).decode().rstrip("=")
        if len(token) > self.max_chars:
            raise ValueError("page token payload too large")
        return token

    def open(self, token: str, user: str, scope: str, *, foreign: str = FOREIGN) -> Any:
        """The payload of `token`; InvalidInput when it is malformed, forged, or issued for
        another user or scope (`foreign` is the message then)."""
        if not token or len(token) > self.max_chars:
            raise InvalidInput(INVALID)
        try:
            blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, binascii.Error):
            raise InvalidInput(INVALID) from None
        mac, body = blob[:MAC_BYTES], blob[MAC_BYTES:]
        if len(mac) != MAC_BYTES or not hmac.compare_digest(mac, self._mac(body)):
            raise InvalidInput(INVALID)
        try:
            t_user, t_scope, payload = json.loads(body)
        except (ValueError, TypeError):
            raise InvalidInput(INVALID) from None
        if t_user != user or t_scope != scope:
            raise InvalidInput(foreign)
        return payload


@dataclass(frozen=True)
class Cursor:
    """The position after the last item of a page: its sort time and id."""

    ts: int
    id: str


class PageTokens:
    """Tokens of (time, id) cursors: encode(None) is "" (the last page), decode("") is None."""

    def __init__(self, secret: str, purpose: str = "listing") -> None:
        self.tokens = SignedTokens(secret, purpose)

    def encode(self, user: str, scope: str, cursor: Cursor | None) -> str:
        if cursor is None:
            return ""
        return self.tokens.seal(user, scope, [cursor.ts, cursor.id])

    def decode(self, token: str, user: str, scope: str) -> Cursor | None:
        if not token:
            return None
        payload = self.tokens.open(token, user, scope)
        if (not isinstance(payload, list) or len(payload) != 2 or type(payload[0]) is not int
                or not isinstance(payload[1], str)):
            raise InvalidInput(INVALID)
        return Cursor(ts=payload[0], id=payload[1])
