"""HTML mail bodies to plain text, for snippets and the search index.

Uses the stdlib html.parser: scripts, styles and the head are dropped, block elements become
line breaks, links keep their text, entities are decoded and whitespace is collapsed. Input and
output are bounded and nothing raises, whatever the markup.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

__all__ = ["html_to_text"]

MAX_HTML_INPUT_CHARS = 4_000_000
DEFAULT_MAX_TEXT_CHARS = 1_000_000

_DROP = frozenset({"script", "style", "head", "title", "template", "noembed", "object", "svg"})
_BLOCK = frozenset({
    "address", "article", "aside", "blockquote", "br", "caption", "center", "dd", "div", "dl",
    "dt", "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5",
    "h6", "header", "hr", "li", "main", "nav", "ol", "p", "pre", "section", "table", "tbody",
    "tfoot", "thead", "tr", "ul",
})
_VOID = frozenset({"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "wbr"})
_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


class _TextExtractor(HTMLParser):
    def __init__(self, limit: int) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.size = 0
        self.limit = limit
        self.drop_depth = 0

    def _emit(self, text: str) -> None:
        if self.size >= self.limit:
            return
        self.parts.append(text)
        self.size += len(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self.drop_depth = 0  # a head that was never closed ends here
        elif tag in _DROP:
            self.drop_depth += 1
        elif tag in _BLOCK:
            self._emit("\n")
        elif tag in ("td", "th"):
            self._emit(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK:
            self._emit("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROP:
            if self.drop_depth:
                self.drop_depth -= 1
        elif tag in _BLOCK and tag not in _VOID:
            self._emit("\n")

    def handle_data(self, data: str) -> None:
        if not self.drop_depth:
            self._emit(data)


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
            parser.feed(html[:MAX_HTML_INPUT_CHARS])
            parser.close()
        except Exception:  # html.parser can still trip on odd markup; keep what we have
            pass
        text = "".join(parser.parts).replace("\xa0", " ").replace("\r", "")
        return _collapse(text)[:max_chars]
    except Exception:
        return ""
