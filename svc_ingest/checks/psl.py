"""Organizational domains (RFC 7489 3.2) from the Public Suffix List that the
`publicsuffixlist` package ships (and refreshes with its releases).

Both sections of the list count, ICANN and private: foo.github.io and bar.github.io belong to
different owners, so they must not align with each other. A name that is itself a public
suffix (or under an unknown TLD with one label) is its own organizational domain.
"""

from __future__ import annotations

from functools import lru_cache

from publicsuffixlist import PublicSuffixList


@lru_cache(maxsize=1)
def _list() -> PublicSuffixList:
    return PublicSuffixList()  # parses the bundled list once (~20 ms)


@lru_cache(maxsize=16384)
def organizational_domain(domain: str) -> str:
    """example.co.uk for a.b.example.co.uk; lowercase, without a trailing dot."""
    name = domain.strip().rstrip(".").lower()
    if not name:
        return ""
    return _list().privatesuffix(name) or name


__all__ = ["organizational_domain"]
