"""Search's page tokens, sealed by mailmesh_common.pagetoken (signed, user-bound).

A token carries the user, a digest of the query and order it belongs to (its scope), the time
relative dates were resolved at (so every page of a search means the same thing), the backend
cursor and the number of results already returned. A token that was altered, or that belongs to
another user, query or order, is rejected with INVALID_ARGUMENT; the user filter comes from the
request's parent anyway.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mailmesh_common.errors import InvalidInput
from mailmesh_common.pagetoken import INVALID, MAX_TOKEN_CHARS, SignedTokens
from svc_search.backends.base import Cursor, Order

__all__ = ["MAX_TOKEN_CHARS", "PageState", "PageTokens"]

FOREIGN = "page_token belongs to another search (same parent, query and order needed)"


@dataclass(frozen=True)
class PageState:
    now: int
    cursor: Cursor
    returned: int


def _scope(query: str, order: Order) -> str:
    return hashlib.sha256(f"{order.value}\0{query}".encode()).hexdigest()[:32]


class PageTokens:
    def __init__(self, secret: str) -> None:
        self.tokens = SignedTokens(secret, "search")

    def encode(self, user: str, query: str, order: Order, state: PageState) -> str:
        c = state.cursor
        return self.tokens.seal(user, _scope(query, order), {
            "t": state.now, "n": state.returned, "d": c.date, "i": c.tie, "s": list(c.seen), "o": c.offset})

    def decode(self, token: str, user: str, query: str, order: Order) -> PageState:
        d = self.tokens.open(token, user, _scope(query, order), foreign=FOREIGN)
        try:
            if not isinstance(d, dict) or not isinstance(d["s"], list):
                raise TypeError
            cursor = Cursor(date=_nat(d["d"]), tie=_nat(d["i"]), seen=tuple(str(s) for s in d["s"]),
                            offset=_nat(d["o"]))
            return PageState(now=_nat(d["t"]), cursor=cursor, returned=_nat(d["n"]))
        except (KeyError, TypeError, ValueError):
            raise InvalidInput(INVALID) from None


def _nat(v: object) -> int:
    if type(v) is not int or v < 0:
        raise ValueError
    return v
