"""The RFC 5322.From domain DMARC evaluates: one usable address or nothing, whichever way the
From field is written (the plain forms take a fast path, the rest the structured parser)."""

from __future__ import annotations

import pytest

from svc_ingest.pipeline import header_from_domain


@pytest.mark.parametrize(("from_lines", "domain"), [
    (["From: alice@Example.COM"], "example.com"),
    (["From: Alice Smith <alice@mail.example.com.>"], "mail.example.com"),
    (["From:<alice@example.com>"], "example.com"),
    (["From: Alice", " Smith <alice@example.com>"], "example.com"),  # folded
    (["From: \"Smith, Alice\" <alice@example.com>"], "example.com"),  # quoted name with a comma
    (["From: =?utf-8?q?J=C3=BCrgen?= <j@example.de>"], "example.de"),  # RFC 2047 name
    (["From: alice@example.com (Alice)"], "example.com"),  # a comment
    (["From: alice@example.com, bob@example.org"], ""),  # two authors: no single domain
    (["From: Friends: alice@example.com, bob@example.org;"], ""),  # a group
    (["From: alice@example.com", "From: bob@example.org"], ""),  # two From fields
    ([], ""),
    (["From: not an address"], ""),
])
def test_from_domain(from_lines: list[str], domain: str) -> None:
    raw = "\r\n".join(["Subject: x", *from_lines, "To: a@b.test", "", "body", ""]).encode()
    assert header_from_domain(raw) == domain


def test_from_in_the_body_does_not_count() -> None:
    assert header_from_domain(b"Subject: x\r\n\r\nFrom: alice@example.com\r\n") == ""
