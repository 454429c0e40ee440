"""Tokens of the Gmail query language. Pure: no I/O, never raises anything but QuerySyntaxError.

    (  )         grouping
    "..."        a phrase (an unterminated quote is an error)
    -term        negation, when `-` starts a term (`e-mail` is one word)
    OR  AND      in capitals; AND is the same as a space
    name:value   a known operator (from: to: ... larger:); the value is the rest of the word, a
                 "phrase" or a (group) right after the colon. An unknown `name:` is a plain word.
    word         anything else up to white space, a parenthesis or a quote
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from svc_search.query.errors import QuerySyntaxError

OPERATORS = frozenset({
    "from", "to", "cc", "bcc", "subject", "filename", "has", "is", "in", "label",
    "after", "before", "older", "newer", "older_than", "newer_than", "larger", "smaller", "size",
})


class Kind(Enum):
    LPAREN = "'('"
    RPAREN = "')'"
    MINUS = "'-'"
    OR = "OR"
    AND = "AND"
    WORD = "a word"
    PHRASE = "a phrase"
    OP = "an operator"
    EOF = "end of query"


@dataclass(frozen=True)
class Token:
    kind: Kind
    text: str
    pos: int

    def describe(self) -> str:
        if self.kind in (Kind.WORD, Kind.OP):
            return repr(self.text + (":" if self.kind == Kind.OP else ""))
        if self.kind == Kind.PHRASE:
            return f'"{self.text}"'
        return self.kind.value


_STOP = frozenset('()"')


def tokenize(query: str) -> list[Token]:
    """The tokens of `query`, ending with EOF."""
    out: list[Token] = []
    i, n = 0, len(query)
    term_start = True  # at a place where `-` negates (start, after space, '(' or '-')
    while i < n:
        c = query[i]
        if c.isspace():
            i += 1
            term_start = True
            continue
        if c == "(":
            out.append(Token(Kind.LPAREN, c, i))
            i += 1
            term_start = True
            continue
        if c == ")":
            out.append(Token(Kind.RPAREN, c, i))
            i += 1
            term_start = False
            continue
        if c == '"':
            end = query.find('"', i + 1)
            if end < 0:
                raise QuerySyntaxError(n, 'a closing quote (") for the phrase opened at character '
                                       f"{i + 1}", "the end of the query")
            out.append(Token(Kind.PHRASE, query[i + 1:end], i))
            i = end + 1
            term_start = False
            continue
        if c == "-" and term_start and i + 1 < n and not query[i + 1].isspace() and query[i + 1] != ")":
            out.append(Token(Kind.MINUS, c, i))
            i += 1
            continue  # still at a term start: "--x" and "-(x)" work
        j = i
        while j < n and not query[j].isspace() and query[j] not in _STOP:
            j += 1
        word = query[i:j]
        term_start = False
        if word in ("OR", "AND"):
            out.append(Token(Kind.OR if word == "OR" else Kind.AND, word, i))
            i = j
            continue
        colon = word.find(":")
        if colon > 0 and word[:colon].lower() in OPERATORS:
            name = word[:colon].lower()
            value = word[colon + 1:]
            out.append(Token(Kind.OP, name, i))
            if value:
                out.append(Token(Kind.WORD, value, i + colon + 1))
            elif j >= n or query[j] not in '"(':
                raise QuerySyntaxError(i + colon + 1, f"a value after {name}:",
                                       "white space" if j < n else "the end of the query")
            i = j
            continue
        out.append(Token(Kind.WORD, word, i))
        i = j
    out.append(Token(Kind.EOF, "", n))
    return out
