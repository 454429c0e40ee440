"""Result snippets: a short plain-text excerpt of the body from just before the first match
(when it is within the first SCAN_CHARS characters; the start of the body otherwise), with the
ranges of the query's words to highlight (code point offsets into the snippet).

Computed in svc_search from the stored body with the index's own analyzer, so every backend
gives the same snippet. The body is analyzed in chunks only until the first match, and token
offsets are computed for the chosen window only (bodies can be long). Pure functions.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import re
from collections.abc import Callable, Set

from svc_search.text import ANALYZER, spans

SNIPPET_CHARS = 200
SCAN_CHARS = 3_000  # matches are looked for in the first SCAN_CHARS of the body (bounded cost)
CHUNK_CHARS = 1_000
SUBCHUNK_CHARS = 200
LEAD_CHARS = 40  # context kept before the first match
ELLIPSIS = "…"


_SPACE = re.compile(r"\s+")


def _collapse(text: str) -> tuple[str, Callable[[int], int]]:
    """`text` with white space runs as one space, and the map from an input offset (outside
    white space) to its output offset (computed on first use)."""
    table: list[list[int]] = []

    def where(k: int) -> int:
        if not table:
            runs = [(m.end(), m.end() - m.start() - 1) for m in _SPACE.finditer(text)]
            table.extend(([e for e, _ in runs], list(itertools.accumulate(r for _, r in runs))))
        ends, removed = table
        i = bisect.bisect_right(ends, k)
        return k - (removed[i - 1] if i else 0)

    return _SPACE.sub(" ", text), where


def _word_end(text: str, i: int, limit: int = 100) -> int:
    """The first white space at or after i (so no word is cut), at most `limit` further."""
    stop = min(len(text), i + limit)
    while i < stop and not text[i].isspace():
        i += 1
    return i


@functools.lru_cache(maxsize=256)
def _ascii_pattern(highlight: frozenset[str]) -> re.Pattern[str] | None:
    """In ASCII text the analyzer's tokens are exactly the lowercased runs of [A-Za-z0-9]: a
    regular expression finds the highlighted ones (much faster than computing every token)."""
    words = sorted((w for w in highlight if w.isascii()), key=len, reverse=True)
    if not words:
        return None
    return re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(map(re.escape, words)) + r")(?![A-Za-z0-9])",
                      re.IGNORECASE)


def first_match(text: str, highlight: Set[str], base: int = 0, size: int = CHUNK_CHARS, *,
                fast: bool = True) -> int:
    """Offset of the first token of `text` in `highlight`, or -1: ASCII text by a regular
    expression; other text analyzed chunk by chunk, a matching chunk narrowed down before token
    offsets are computed (they are costly)."""
    if fast and base == 0:
        head = text[:SCAN_CHARS]
        if head.isascii():
            pattern = _ascii_pattern(frozenset(highlight))
            m = pattern.search(head) if pattern else None
            return m.start() if m else -1
    i = 0
    n = min(len(text), SCAN_CHARS)
    while i < n:
        j = _word_end(text, min(n, i + size))
        chunk = text[i:j]
        if not highlight.isdisjoint(ANALYZER.analyze(chunk)):
            if size > SUBCHUNK_CHARS:
                found = first_match(chunk, highlight, base + i, SUBCHUNK_CHARS, fast=False)
                if found >= 0:
                    return found
            for token, start, _ in spans(chunk):
                if token in highlight:
                    return base + i + start
        i = j if j > i else i + 1
    return -1


def make_snippet(body: str, highlight: Set[str], *, fast: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """(snippet, [(start, end), ...]) for `body` and the tokens to highlight (`fast`: use the
    regular expression path for ASCII text; the same result, tested)."""
    if not body:
        return "", []
    at = first_match(body, highlight, fast=fast) if highlight else -1
    start = 0
    if at > 0:
        start = max(0, at - LEAD_CHARS)
        while 0 < start < at and not body[start - 1].isspace():
            start += 1  # do not start inside a word
    end = _word_end(body, min(len(body), start + SNIPPET_CHARS + 60))
    window = body[start:end]
    collapsed, where = _collapse(window)
    shift = 1 if collapsed[:1] == " " else 0
    text = collapsed.strip()
    cut = len(text)
    if cut > SNIPPET_CHARS:
        cut = text.rfind(" ", 0, SNIPPET_CHARS)
        cut = cut if cut > SNIPPET_CHARS // 2 else SNIPPET_CHARS
    prefix = ELLIPSIS if start > 0 else ""
    suffix = ELLIPSIS if cut < len(text) or end < len(body) else ""
    ranges: list[tuple[int, int]] = []
    if at >= 0:
        pattern = _ascii_pattern(frozenset(highlight)) if fast and window.isascii() else None
        found = ([(m.start(), m.end()) for m in pattern.finditer(window)] if pattern is not None
                 else [(a, b) for token, a, b in spans(window) if token in highlight])
        for t_start, t_end in found:
            a, b = where(t_start) - shift, where(t_end) - shift
            if 0 <= a < b <= cut:
                ranges.append((a + len(prefix), b + len(prefix)))
    return prefix + text[:cut] + suffix, ranges
