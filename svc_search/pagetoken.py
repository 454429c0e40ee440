"""Opaque, signed page tokens for Search.

A token carries the user, a digest of the query and order it belongs to, the time relative
dates were resolved at (so every page of a search means the same thing), the backend cursor
and the number of results already returned. It is signed with an HMAC keyed by the mesh's
secret: a token that was altered, or that belongs to another user, query or order, is rejected
with INVALID_ARGUMENT, and the user filter comes from the request's parent anyway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

from mailmesh_common.errors import InvalidInput
from svc_search.backends.base import Cursor, Order

MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True)
class PageState:
    now: int
    cursor: Cursor
    returned: int


def _digest(query: str, order: Order) -> str:
    return hashlib.sha256(f"{order.value}\0{query}".encode()).hexdigest()[:32]


class PageTokens:
    def __init__(self, secret: str) -> None:
        self.key = hashlib.sha256(b"mailmesh-search-page-token\0" + secret.encode()).digest()

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self.key, body, hashlib.sha256).digest()[:16]

    def encode(self, user: str, query: str, order: Order, state: PageState) -> str:
        c = state.cursor
        body = json.dumps({"u": user, "q": _digest(query, order), "t": state.now, "n": state.returned,
                           "d": c.date, "i": c.tie, "s": list(c.seen), "o": c.offset},
                          separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(self._sign(body) + body).decode().rstrip("=")

    def decode(self, token: str, user: str, query: str, order: Order) -> PageState:
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidInput("page_token is not valid")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raise InvalidInput("page_token is not valid") from None
        sig, body = raw[:16], raw[16:]
        if len(sig) != 16 or not hmac.compare_digest(sig, self._sign(body)):
            raise InvalidInput("page_token is not valid")
        try:
            d = json.loads(body)
            if d["u"] != user or d["q"] != _digest(query, order):
                raise InvalidInput("page_token belongs to another search (same parent, query and order needed)")
            cursor = Cursor(date=int(d["d"]), tie=int(d["i"]), seen=tuple(str(s) for s in d["s"]),
                            offset=int(d["o"]))
            return PageState(now=int(d["t"]), cursor=cursor, returned=int(d["n"]))
        except (KeyError, TypeError, ValueError):
            raise InvalidInput("page_token is not valid") from None
