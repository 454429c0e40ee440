"""The mesh's one page-token implementation: round trips, and every forged, foreign or
malformed token is INVALID_ARGUMENT (InvalidInput), never a crash or another user's page."""

from __future__ import annotations

import base64
import json

import pytest

from mailmesh_common.errors import InvalidInput
from mailmesh_common.pagetoken import Cursor, PageTokens, SignedTokens


def test_cursor_tokens_round_trip_and_the_last_page_has_none() -> None:
    t = PageTokens("secret")
    tok = t.encode("u1", "m:INBOX", Cursor(ts=1_700_000_000_123, id="msg-9"))
    assert tok
    assert t.decode(tok, "u1", "m:INBOX") == Cursor(ts=1_700_000_000_123, id="msg-9")
    assert t.encode("u1", "m:INBOX", None) == ""
    assert t.decode("", "u1", "m:INBOX") is None


def test_foreign_user_scope_secret_or_purpose_is_rejected() -> None:
    t = PageTokens("secret")
    tok = t.encode("alice", "m:INBOX", Cursor(5, "x"))
    with pytest.raises(InvalidInput, match="does not belong"):
        t.decode(tok, "bob", "m:INBOX")
    with pytest.raises(InvalidInput, match="does not belong"):
        t.decode(tok, "alice", "m:SENT")
    with pytest.raises(InvalidInput, match="not valid"):
        PageTokens("another secret").decode(tok, "alice", "m:INBOX")
    with pytest.raises(InvalidInput, match="not valid"):  # a token of another service
        PageTokens("secret", purpose="search").decode(tok, "alice", "m:INBOX")


def test_tampered_tokens_are_rejected() -> None:
    t = PageTokens("secret")
    tok = t.encode("alice", "m:INBOX", Cursor(5, "x"))
    raw = base64.urlsafe_b64decode(tok + "=" * (-len(tok) % 4))
    mac, body = raw[:16], raw[16:]
    assert json.loads(body) == ["alice", "m:INBOX", [5, "x"]]
    # rewrite the user inside the body, keeping the old signature: the MAC no longer matches
    forged_body = json.dumps(["bob", "m:INBOX", [5, "x"]], separators=(",", ":")).encode()
    forged = base64.urlsafe_b64encode(mac + forged_body).decode().rstrip("=")
    with pytest.raises(InvalidInput, match="not valid"):
        t.decode(forged, "bob", "m:INBOX")
    for i in range(len(tok)):  # any single character changed
        flipped = tok[:i] + ("A" if tok[i] != "A" else "B") + tok[i + 1:]
        try:
            got = t.decode(flipped, "alice", "m:INBOX")
        except InvalidInput:
            continue
        # base64 padding bits may absorb a change of the last character: same bytes, same cursor
        assert got == Cursor(5, "x")
    for bad in ("x", "!!!!", "====", tok[:10], tok + "AAAA", "A" * 9000, "\x00" * 30):
        with pytest.raises(InvalidInput):
            t.decode(bad, "alice", "m:INBOX")


def test_a_signed_payload_of_the_wrong_shape_is_rejected() -> None:
    s = SignedTokens("secret", "listing")
    for payload in ([5], {"ts": 5}, ["5", "x"], [5, 6], [5.5, "x"], [True, "x"], None):
        tok = s.seal("alice", "scope", payload)
        with pytest.raises(InvalidInput, match="not valid"):
            PageTokens("secret").decode(tok, "alice", "scope")
    with pytest.raises(ValueError):
        SignedTokens("secret", "")
