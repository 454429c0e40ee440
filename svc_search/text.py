"""The one text analyzer of svc_search: how text becomes search tokens, everywhere.

Documents (tantivy indexes with it; Meilisearch gets its tokens), queries, the in-process
evaluator and snippets all use this analyzer, so a word matches the same way on every backend:
split on every non-alphanumeric character (Unicode-aware), lowercase, fold accents to ASCII
(café → cafe, Straße → strasse), and drop tokens of MAX_TOKEN_BYTES or more.
"""

from __future__ import annotations

import tantivy

TOKENIZER = "mailmesh"
MAX_TOKEN_BYTES = 64


def _build() -> tantivy.TextAnalyzer:
    return (tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
            .filter(tantivy.Filter.remove_long(MAX_TOKEN_BYTES))
            .filter(tantivy.Filter.lowercase())
            .filter(tantivy.Filter.ascii_fold())
            .build())


ANALYZER = _build()


def analyzer() -> tantivy.TextAnalyzer:
    """A fresh analyzer (to register with a tantivy index)."""
    return _build()


def tokens(text: str) -> list[str]:
    """The search tokens of `text`, in order."""
    if not text:
        return []
    return list(ANALYZER.analyze(text))


def spans(text: str) -> list[tuple[str, int, int]]:
    """(token, start, end) of each token of `text`, with code point offsets (for highlighting)."""
    if not text:
        return []
    return [(t.text, t.char_offset_from, t.char_offset_to) for t in ANALYZER.pre_tokenize(text).tokens]
