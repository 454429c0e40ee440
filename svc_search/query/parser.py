"""Recursive-descent parser of the Gmail query language into the syntax tree of ast.py.

Grammar (Gmail's precedence: OR binds tighter than the implicit AND, so `a b OR c` is
`a AND (b OR c)`):

    query    := sequence EOF
    sequence := { [AND] disjunct }                     -- ends at ')' or EOF
    disjunct := unary { OR unary }
    unary    := '-' unary | primary
    primary  := '(' sequence ')' | PHRASE | WORD | OP value
    value    := WORD | PHRASE | '(' sequence ')'       -- a group only for text operators

Operator values are validated here (dates, sizes, units, is:/has: values) and a malformed query
raises QuerySyntaxError with the position and what was expected. Pure: no I/O.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from mailmesh_common.errors import InvalidInput
from svc_search.query import ast
from svc_search.query.errors import QuerySyntaxError
from svc_search.query.lexer import Kind, Token, tokenize

MAX_QUERY_CHARS = 2000
MAX_TERMS = 100
MAX_DEPTH = 20

TEXT_OPERATORS = frozenset({"from", "to", "cc", "bcc", "subject", "filename"})
IS_VALUES = ("unread", "read", "starred", "important")
_DATE = re.compile(r"^(\d{4})[/-](\d{1,2})[/-](\d{1,2})$")
_EPOCH = re.compile(r"^\d{1,12}$")
_RELATIVE = re.compile(r"^(\d{1,6})([dmy])$", re.IGNORECASE)
_SIZE = re.compile(r"^(\d{1,15}(?:\.\d{1,6})?)([km]?)b?$", re.IGNORECASE)
MAX_SIZE = 1 << 53


def parse(query: str) -> ast.Node:
    """The syntax tree of `query`; an empty query is ast.Everything."""
    if len(query) > MAX_QUERY_CHARS:
        raise InvalidInput(f"query is longer than {MAX_QUERY_CHARS} characters")
    return _Parser(tokenize(query)).parse()


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.i = 0
        self.terms = 0
        self.depth = 0

    # --- helpers
    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def next(self) -> Token:
        t = self.tokens[self.i]
        if t.kind != Kind.EOF:
            self.i += 1
        return t

    def fail(self, expected: str, tok: Token | None = None) -> QuerySyntaxError:
        t = tok or self.tok
        return QuerySyntaxError(t.pos, expected, t.describe())

    def leaf(self, node: ast.Node) -> ast.Node:
        self.terms += 1
        if self.terms > MAX_TERMS:
            raise QuerySyntaxError(node.pos, f"at most {MAX_TERMS} terms in a query")
        return node

    def enter(self, tok: Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise QuerySyntaxError(tok.pos, f"at most {MAX_DEPTH} levels of parentheses and negations")

    # --- grammar
    def parse(self) -> ast.Node:
        node = self.sequence(None)
        if self.tok.kind != Kind.EOF:
            raise self.fail("a word, phrase or operator")  # a stray ')'
        return node or ast.Everything(0)

    def sequence(self, scope: str | None) -> ast.Node | None:
        items: list[ast.Node] = []
        start = self.tok.pos
        while self.tok.kind not in (Kind.EOF, Kind.RPAREN):
            if self.tok.kind == Kind.AND:
                and_tok = self.next()
                if not items or self.tok.kind in (Kind.EOF, Kind.RPAREN, Kind.OR, Kind.AND):
                    where = "before" if not items else "after"
                    raise self.fail(f"a term {where} AND", and_tok if not items else None)
                continue
            if self.tok.kind == Kind.OR:
                raise self.fail("a term before OR")
            items.append(self.disjunct(scope))
        if not items:
            return None
        return items[0] if len(items) == 1 else ast.And(start, tuple(items))

    def disjunct(self, scope: str | None) -> ast.Node:
        first = self.unary(scope)
        items = [first]
        while self.tok.kind == Kind.OR:
            self.next()
            if self.tok.kind in (Kind.EOF, Kind.RPAREN, Kind.OR, Kind.AND):
                raise self.fail("a term after OR")
            items.append(self.unary(scope))
        return first if len(items) == 1 else ast.Or(first.pos, tuple(items))

    def unary(self, scope: str | None) -> ast.Node:
        tok = self.tok
        if tok.kind == Kind.MINUS:
            self.next()
            self.enter(tok)
            if self.tok.kind in (Kind.EOF, Kind.RPAREN, Kind.OR, Kind.AND):
                raise self.fail("a term after '-'")
            child = self.unary(scope)
            self.depth -= 1
            return ast.Not(tok.pos, child)
        return self.primary(scope)

    def group(self, scope: str | None) -> ast.Node:
        open_tok = self.next()  # '('
        self.enter(open_tok)
        node = self.sequence(scope)
        if self.tok.kind != Kind.RPAREN:
            raise self.fail(f"')' to close the parenthesis at character {open_tok.pos + 1}")
        if node is None:
            raise self.fail("a term inside the parentheses")
        self.next()
        self.depth -= 1
        return node

    def primary(self, scope: str | None) -> ast.Node:
        tok = self.tok
        if tok.kind == Kind.LPAREN:
            return self.group(scope)
        if tok.kind == Kind.PHRASE:
            self.next()
            return self.leaf(ast.Text(tok.pos, scope, tok.text, quoted=True))
        if tok.kind == Kind.WORD:
            self.next()
            return self.leaf(ast.Text(tok.pos, scope, tok.text))
        if tok.kind == Kind.OP:
            if scope is not None:
                raise self.fail(f"a word or phrase inside {scope}:( )")
            self.next()
            return self.operator(tok)
        raise self.fail("a word, phrase or operator")

    def operator(self, op: Token) -> ast.Node:
        name = op.text
        value = self.tok
        if name in TEXT_OPERATORS:
            if value.kind == Kind.LPAREN:
                return self.group(name)
            self.next()
            return self.leaf(ast.Text(op.pos, name, value.text, quoted=value.kind == Kind.PHRASE))
        if value.kind not in (Kind.WORD, Kind.PHRASE):
            raise self.fail(f"a value after {name}:")
        self.next()
        text = value.text.strip()
        if name in ("in", "label"):
            if not text:
                raise QuerySyntaxError(value.pos, f"a label name after {name}:", value.describe())
            return self.leaf(ast.InLabel(op.pos, text))
        if value.kind == Kind.PHRASE:
            raise QuerySyntaxError(value.pos, f"an unquoted value after {name}:", value.describe())
        low = text.lower()
        if name == "has":
            if low != "attachment":
                raise QuerySyntaxError(value.pos, "has:attachment", value.describe())
            return self.leaf(ast.HasAttachment(op.pos))
        if name == "is":
            if low not in IS_VALUES:
                raise QuerySyntaxError(value.pos, "is:" + "|".join(IS_VALUES), value.describe())
            return self.leaf(ast.Is(op.pos, low))
        if name in ("after", "before", "newer", "older"):
            bound = "after" if name in ("after", "newer") else "before"
            return self.leaf(ast.DateBound(op.pos, bound, _date(text, value)))
        if name in ("older_than", "newer_than"):
            m = _RELATIVE.match(text)
            if not m:
                raise QuerySyntaxError(value.pos, f"a period like 3d, 2m or 1y after {name}:", value.describe())
            return self.leaf(ast.Relative(op.pos, name, int(m.group(1)), m.group(2).lower()))
        # larger: smaller: size:
        m = _SIZE.match(text)
        if not m:
            raise QuerySyntaxError(value.pos, f"a size in bytes, or with K or M, after {name}:", value.describe())
        scale = {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
        size = int(float(m.group(1)) * scale) if "." in m.group(1) else int(m.group(1)) * scale
        if size > MAX_SIZE:
            raise QuerySyntaxError(value.pos, f"a size of at most {MAX_SIZE} bytes", value.describe())
        return self.leaf(ast.Size(op.pos, "smaller" if name == "smaller" else "larger", size))


def _date(text: str, tok: Token) -> int:
    """Seconds since the epoch of a YYYY/MM/DD date's midnight (UTC), or of an epoch value."""
    if _EPOCH.match(text):
        return int(text)
    m = _DATE.match(text)
    if m:
        try:
            return int(datetime(int(m.group(1)), int(m.group(2)), int(m.group(3)), tzinfo=UTC).timestamp())
        except ValueError:
            pass
    raise QuerySyntaxError(tok.pos, "a date YYYY/MM/DD", tok.describe())
