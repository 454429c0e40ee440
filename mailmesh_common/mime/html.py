"""HTML mail bodies to plain text, for snippets and the search index.

Uses the stdlib html.parser: scripts, styles and the head are dropped, block elements become
line breaks, links keep their text, entities are decoded and whitespace is collapsed. Input and
output are bounded and nothing raises, whatever the markup.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

__all__ = ["html_to_text"]

MAX_HTML_INPUT_CHARS = 1_000_000  # html.parser runs at roughly 1 s per MB of markup
MAX_TAG_CHARS = 8192
MAX_COMMENT_CHARS = 1_000_000
DEFAULT_MAX_TEXT_CHARS = 1_000_000

_DROP = frozenset({"script", "style", "head", "title", "template", "noembed", "object", "svg"})
_BLOCK = frozenset({
    "address", "article", "aside", "blockquote", "br", "caption", "center", "dd", "div", "dl",
    "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5",
    "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "tbody",
    "tfoot", "thead", "tr", "ul",
})
# Blocks that stand apart as paragraphs (a blank line around them).
_PARAGRAPH = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table",
                        "ul", "ol", "dl", "hr", "figure"})
_SPACES = re.compile(r"[^\S\n]+")
_ANY_SPACE = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")


class _TextExtractor(HTMLParser):
    def __init__(self, limit: int) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.size = 0
        self.limit = limit
        self.drop_depth = 0
        self.pending_breaks = 0  # line breaks owed before the next text
        self.pre_depth = 0  # inside <pre> source line breaks are kept

    def _emit(self, text: str) -> None:
        if self.size >= self.limit:
            return
        self.parts.append(text)
        self.size += len(text)

    def _block(self, tag: str) -> None:
        self.pending_breaks = max(self.pending_breaks, 2 if tag in _PARAGRAPH else 1)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self.drop_depth = 0  # a head that was never closed ends here
        elif tag in _DROP:
            self.drop_depth += 1
        elif tag == "br":
            self.pending_breaks = min(self.pending_breaks + 1, 2)
        elif tag in _BLOCK:
            self._block(tag)
            if tag == "pre":
                self.pre_depth += 1
        elif tag in ("td", "th"):
            self._emit(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROP:
            if self.drop_depth:
                self.drop_depth -= 1
        elif tag in _BLOCK and tag != "br":
            self._block(tag)
            if tag == "pre" and self.pre_depth:
                self.pre_depth -= 1

    def handle_data(self, data: str) -> None:
        if self.drop_depth or not data:
            return
        if not self.pre_depth:
            data = _ANY_SPACE.sub(" ", data)  # source line breaks are just spaces in HTML
        if self.pending_breaks and not data.strip():
            return  # whitespace between blocks
        if self.pending_breaks and self.parts:
            self._emit("\n" * self.pending_breaks)
        self.pending_breaks = 0
        self._emit(data)


class _Finder:
    """str.find of one needle for non-decreasing start positions, linear in total."""

    def __init__(self, text: str, needle: str) -> None:
        self.text = text
        self.needle = needle
        self.found = -1
        self.none_from = len(text) + 1  # a search from here on finds nothing

    def find(self, start: int) -> int:
        if start >= self.none_from:
            return -1
        if self.found < start:
            self.found = self.text.find(self.needle, start)
            if self.found < 0:
                self.none_from = start
        return self.found


def _tidy(html: str) -> str:
    """Escape every '<' that does not open a complete tag or comment; blank out overlong
    ones. html.parser rescans unterminated tags and comments and turns quadratic (or worse)
    on input such as "<a <a <a ..."; after this linear pass each tag closes before the
    next '<'."""
    out: list[str] = []
    lt, gt, close = _Finder(html, "<"), _Finder(html, ">"), _Finder(html, "-->")
    n = len(html)
    i = 0
    while (j := lt.find(i)) >= 0:
        out.append(html[i:j])
        if html.startswith("<!--", j):
            end = close.find(j + 4)
            if end >= 0:
                out.append(html[j : end + 3] if end - j <= MAX_COMMENT_CHARS else " ")
                i = end + 3
                continue
        elif j + 1 < n and (html[j + 1].isalpha() or html[j + 1] in "/!?"):
            end = gt.find(j + 1)
            following = lt.find(j + 1)
            if end >= 0 and (following < 0 or end < following):
                out.append(html[j : end + 1] if end - j <= MAX_TAG_CHARS else " ")
                i = end + 1
                continue
        out.append("&lt;")
        i = j + 1
    out.append(html[i:])
    return "".join(out)


def _collapse(text: str) -> str:
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def html_to_text(html: str, *, max_chars: int = DEFAULT_MAX_TEXT_CHARS) -> str:
    """Readable text of an HTML document, at most max_chars long. Never raises."""
    try:
        if not isinstance(html, str) or not html:
            return ""
        parser = _TextExtractor(limit=max_chars)
        try:
            parser.feed(_tidy(html[:MAX_HTML_INPUT_CHARS]))
            parser.close()
        except Exception:  # html.parser can still trip on odd markup; keep what we have
            pass
        text = "".join(parser.parts).replace("\xa0", " ").replace("\r", "")
        return _collapse(text)[:max_chars]
    except Exception:
        return ""
