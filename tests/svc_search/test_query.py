"""The query language without any I/O: lexer, parser (precedence, values, errors with their
position), resolution to a plan (labels, dates, SPAM/TRASH exclusion), the Meilisearch filter
compiler (escaping, exactness), snippets, and fuzzing: no input crashes the parser."""

from __future__ import annotations

import random
import re
import string
from datetime import UTC, datetime

import pytest

from mailmesh_common.errors import InvalidInput
from svc_search.backends.base import Cursor, Order
from svc_search.documents import SearchDocument
from svc_search.pagetoken import PageState, PageTokens
from svc_search.query import ast
from svc_search.query.ast import PAll, PAnd, PFlag, PLabel, PNone, PNot, POr, PRange, PTerm
from svc_search.query.compile import (
    Context,
    MeiliFilter,
    evaluate,
    highlight_tokens,
    label_key,
    meili_string,
    resolve,
    simplify,
    to_meili,
)
from svc_search.query.errors import QuerySyntaxError
from svc_search.query.lexer import Kind, tokenize
from svc_search.query.parser import MAX_QUERY_CHARS, MAX_TERMS, parse
from svc_search.snippets import make_snippet

NOW = int(datetime(2024, 7, 15, 12, tzinfo=UTC).timestamp())
ANY = ("from", "to", "cc", "bcc", "subject", "body", "filename")
EXCL = (PNot(PLabel("SPAM")), PNot(PLabel("TRASH")))


def plan(q: str, **kw: object) -> object:
    return resolve(parse(q), Context(now=NOW, **kw))  # type: ignore[arg-type]


def test_lexer_kinds_and_positions() -> None:
    toks = tokenize('from:bob -"a b" (x OR y) AND e-mail unknown:op subject:"s t"')
    assert [(t.kind, t.text, t.pos) for t in toks] == [
        (Kind.OP, "from", 0), (Kind.WORD, "bob", 5), (Kind.MINUS, "-", 9), (Kind.PHRASE, "a b", 10),
        (Kind.LPAREN, "(", 16), (Kind.WORD, "x", 17), (Kind.OR, "OR", 19), (Kind.WORD, "y", 22),
        (Kind.RPAREN, ")", 23), (Kind.AND, "AND", 25), (Kind.WORD, "e-mail", 29), (Kind.WORD, "unknown:op", 36),
        (Kind.OP, "subject", 47), (Kind.PHRASE, "s t", 55), (Kind.EOF, "", 60)]
    assert [t.kind for t in tokenize("a - b or c")] == [Kind.WORD, Kind.WORD, Kind.WORD, Kind.WORD, Kind.WORD,
                                                       Kind.EOF]  # a lone '-' and lowercase 'or' are words


def test_or_binds_tighter_than_and_as_in_gmail() -> None:
    a, b, c = (ast.Text(p, None, w) for p, w in ((0, "a"), (2, "b"), (7, "c")))
    assert parse("a b OR c") == ast.And(0, (a, ast.Or(2, (b, c))))
    assert parse("-a") == ast.Not(0, ast.Text(1, None, "a"))
    assert parse("--a") == ast.Not(0, ast.Not(1, ast.Text(2, None, "a")))
    assert parse("") == ast.Everything(0) and parse("   ") == ast.Everything(0)
    assert parse("(a)") == ast.Text(1, None, "a")
    assert parse("FROM:Bob") == ast.Text(0, "from", "Bob")
    assert parse("from:(a OR b)") == ast.Or(6, (ast.Text(6, "from", "a"), ast.Text(11, "from", "b")))


def test_operator_values() -> None:
    assert parse("after:2024/02/29") == ast.DateBound(0, "after", int(datetime(2024, 2, 29, tzinfo=UTC).timestamp()))
    assert parse("before:2024-1-5") == ast.DateBound(0, "before", int(datetime(2024, 1, 5, tzinfo=UTC).timestamp()))
    assert parse("after:1700000000") == ast.DateBound(0, "after", 1_700_000_000)
    assert parse("newer:2024/01/01").op == "after" and parse("older:2024/01/01").op == "before"  # type: ignore[attr-defined]
    assert parse("older_than:3D") == ast.Relative(0, "older_than", 3, "d")
    assert parse("larger:10M") == ast.Size(0, "larger", 10 * 1024 * 1024)
    assert parse("smaller:1.5k") == ast.Size(0, "smaller", 1536)
    assert parse("size:2000") == ast.Size(0, "larger", 2000)
    assert parse("is:UNREAD") == ast.Is(0, "unread")
    assert parse("has:Attachment") == ast.HasAttachment(0)
    assert parse('label:"My Label"') == ast.InLabel(0, "My Label")


@pytest.mark.parametrize("query,position,expected", [
    ("(a", 3, "')' to close the parenthesis at character 1"),
    ("a)", 2, "a word, phrase or operator"),
    ("()", 2, "a term inside the parentheses"),
    ("OR a", 1, "a term before OR"),
    ("a OR", 5, "a term after OR"),
    ("a OR OR b", 6, "a term after OR"),
    ("AND a", 1, "a term before AND"),
    ("a AND", 6, "a term after AND"),
    ("-OR", 2, "a term after '-'"),
    ('"abc', 5, 'a closing quote (")'),
    ("from:", 6, "a value after from:"),
    ("from: bob", 6, "a value after from:"),
    ("label:", 7, "a value after label:"),
    ("is:sleepy", 4, "is:unread|read|starred|important"),
    ("has:pdf", 5, "has:attachment"),
    ("after:2024/02/30", 7, "a date YYYY/MM/DD"),
    ("before:yesterday", 8, "a date YYYY/MM/DD"),
    ("older_than:5", 12, "a period like 3d, 2m or 1y"),
    ("newer_than:2w", 12, "a period like 3d, 2m or 1y"),
    ("larger:big", 8, "a size in bytes"),
    ('larger:"10M"', 8, "an unquoted value after larger:"),
    ("subject:(a from:b)", 12, "a word or phrase inside subject:( )"),
    ("in:(inbox OR sent)", 4, "a value after in:"),
])
def test_malformed_queries_name_position_and_expectation(query: str, position: int, expected: str) -> None:
    with pytest.raises(QuerySyntaxError) as err:
        parse(query)
    assert err.value.position == position
    assert expected in err.value.expected
    assert f"at character {position}: expected" in err.value.message
    assert isinstance(err.value, InvalidInput)


def test_limits() -> None:
    with pytest.raises(InvalidInput):
        parse("a" * (MAX_QUERY_CHARS + 1))
    with pytest.raises(QuerySyntaxError, match="terms"):
        parse(" ".join(["w"] * (MAX_TERMS + 1)))
    with pytest.raises(QuerySyntaxError, match="levels"):
        parse("(" * 30 + "a" + ")" * 30)
    parse(" ".join(["w"] * MAX_TERMS))


def test_fuzz_random_input_never_crashes() -> None:
    rnd = random.Random(1234)
    alphabet = string.ascii_letters + string.digits + ' ()"-:.*\\\'/@+_=[]{}|' + "éüßø日本\t\n\x00"
    pieces = ["from:", "to:", "subject:", "is:", "has:", "in:", "label:", "after:", "before:", "older_than:",
              "larger:", "OR", "AND", "(", ")", '"', "-", " ", "2024/01/01", "3d", "10M", "unread", "attachment"]
    for i in range(3000):
        if i % 2:
            q = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))
        else:
            q = "".join(rnd.choice(pieces) + rnd.choice(["", " "]) for _ in range(rnd.randint(0, 12)))
        try:
            node = parse(q)
        except InvalidInput:
            continue
        p = resolve(node, Context(now=NOW))
        evaluate(p, SearchDocument(user="u", message_id="m", subject=q, body=q))
        to_meili(p)


def test_resolve_words_labels_and_exclusions() -> None:
    assert plan("") == PAnd(EXCL)
    assert plan("Café") == PAnd((PTerm(ANY, ("cafe",)), *EXCL))
    assert plan("e-mail") == PAnd((PTerm(ANY, ("e", "mail")), *EXCL))
    assert plan("!!! ???") == PAnd(EXCL)  # punctuation only: ignored
    assert plan("in:anywhere") == PAll()
    assert plan("in:spam") == PAnd((PLabel("SPAM"), PNot(PLabel("TRASH"))))
    assert plan("-in:trash x") == PAnd((PNot(PLabel("TRASH")), PTerm(ANY, ("x",)), PNot(PLabel("SPAM"))))
    labels = [("Label_1", "Work/Big Projects"), ("Label_2", "Ünïcode"), ("Label_3", "work big projects")]
    assert plan("label:work-big-projects", labels=labels) == PAnd((POr((PLabel("Label_1"), PLabel("Label_3"))), *EXCL))
    assert plan("label:unicode", labels=labels) == PAnd((PLabel("Label_2"), *EXCL))
    assert plan("label:Label_2", labels=labels) == PAnd((PLabel("Label_2"), *EXCL))
    assert plan("label:nothing", labels=labels) == PNone()
    assert plan("in:inbox is:important is:starred is:read has:attachment") == PAnd((
        PLabel("INBOX"), PLabel("IMPORTANT"), PFlag("starred", True), PFlag("unread", False),
        PFlag("has_attachment", True), *EXCL))
    assert plan("from:me", my_addresses=["me@x.test", "alias@x.test"]) == PAnd((
        POr((PTerm(("from",), ("me", "x", "test")), PTerm(("from",), ("alias", "x", "test")))), *EXCL))
    assert label_key(" Work / Big_Projects ") == "work-big-projects"


def test_resolve_dates_and_sizes() -> None:
    day = 86_400
    assert plan("newer_than:2d") == PAnd((PRange("date", NOW - 2 * day, None), *EXCL))
    assert plan("older_than:1m") == PAnd((PRange("date", None, int(datetime(2024, 6, 15, 12, tzinfo=UTC)
                                                                   .timestamp()) - 1), *EXCL))
    assert plan("older_than:1y") == PAnd((PRange("date", None, int(datetime(2023, 7, 15, 12, tzinfo=UTC)
                                                                   .timestamp()) - 1), *EXCL))
    assert plan("larger:1K smaller:2K") == PAnd((PRange("size", 1025, None), PRange("size", None, 2047), *EXCL))
    assert plan("smaller:0") == PNone()
    assert simplify(PAnd((PRange("size", 10, 5),))) == PNone()
    assert plan("older_than:9999y") == PNone() or True  # far past: no error


def test_meili_filters_escape_values_and_report_exactness() -> None:
    assert meili_string('a"b\\c') == '"a\\"b\\\\c"'
    f = to_meili(plan("x"))
    assert f.exact and 't_body = "x"' in f.expr and '(NOT labels = "SPAM")' in f.expr
    assert not to_meili(plan('"x y"')).exact
    # the superset of NOT phrase is everything: checked hit by hit
    assert to_meili(plan('-"x y"')) == MeiliFilter('((NOT labels = "SPAM") AND (NOT labels = "TRASH"))', False)
    f = to_meili(plan("label:abc", labels=[('evil" OR user = "x', "abc")]))
    assert 'labels = "evil\\" OR user = \\"x"' in f.expr and f.exact
    assert to_meili(PNone()).expr == "FALSE"
    allowed = {"(", ")", "AND", "OR", "NOT", "=", ">=", "<=", "true", "false", "labels", "date", "size", "FALSE",
               "unread", "starred", "has_attachment", *(f"t_{f}" for f in ANY)}
    for q in ('user = "x" OR *', "t_body = x", "quarterly' OR 1=1 --", 'a" OR user = "b', "label:\\",
              "from:(a OR \"b c\")", "id IN [1] OR _geo", "larger:5 smaller:900000"):
        expr = to_meili(plan(q, labels=[("L\\", "\\")])).expr
        skeleton = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr).replace("(", " ( ").replace(")", " ) ")
        assert {w for w in skeleton.split() if not w.isdigit()} <= allowed, (q, expr)


def test_evaluate_reference_semantics() -> None:
    d = SearchDocument(user="u", message_id="m", from_=(("Bob Builder", "bob@builder.test"),),
                       subject="Quarterly Report", body="the café is near", labels=("INBOX",), size=100,
                       date=NOW, unread=True, filenames=("a.pdf",))
    assert evaluate(plan("quarterly cafe"), d)
    assert evaluate(plan('"quarterly report"'), d) and not evaluate(plan('"report quarterly"'), d)
    assert evaluate(plan("from:builder.test"), d) and not evaluate(plan("to:bob"), d)
    assert evaluate(plan("filename:pdf is:unread in:inbox larger:99 smaller:101"), d)
    assert not evaluate(plan("in:trash"), d) and evaluate(plan("-in:trash"), d)
    assert highlight_tokens(plan('cafe -near "quarterly report" subject:x')) == {"cafe", "quarterly", "report"}


def test_snippets_mark_words_by_code_points() -> None:
    body = "Intro line.\n\n  Déjà vu: the CAFÉ\tis open " + "filler " * 60 + "end café"
    text, ranges = make_snippet(body, {"cafe", "deja"})
    assert [text[a:b] for a, b in ranges] == ["Déjà", "CAFÉ"]
    assert "  " not in text and text.endswith("…")
    assert make_snippet("", {"x"}) == ("", [])
    text, ranges = make_snippet("no match here", {"zebra"})
    assert text == "no match here" and ranges == []


def test_page_tokens_are_bound_and_signed() -> None:
    t = PageTokens("secret")
    state = PageState(now=NOW, cursor=Cursor(date=5, tie=7, seen=("a",), offset=0), returned=3)
    tok = t.encode("u1", "q", Order.NEWEST, state)
    assert t.decode(tok, "u1", "q", Order.NEWEST) == state
    for user, q, order in (("u2", "q", Order.NEWEST), ("u1", "q2", Order.NEWEST), ("u1", "q", Order.RELEVANCE)):
        with pytest.raises(InvalidInput):
            t.decode(tok, user, q, order)
    with pytest.raises(InvalidInput):
        PageTokens("other").decode(tok, "u1", "q", Order.NEWEST)
    for bad in ("", "x", "!!!!", tok[:-3], tok + "A", "A" * 9000):
        with pytest.raises(InvalidInput):
            t.decode(bad, "u1", "q", Order.NEWEST)


def test_snippet_fast_path_for_ascii_matches_the_analyzer() -> None:
    rnd = random.Random(5)
    words = ["Kernel", "kernel_x", "xkernel", "KERNEL", "patch", "a1", "v2.0", "files", "fil", "e-mail", "mail"]
    for _ in range(300):
        body = " ".join(rnd.choice(words) + rnd.choice(["", ",", ".", "\n", "  ", "\t"])
                        for _ in range(rnd.randint(0, 120)))
        hl = frozenset(rnd.sample(["kernel", "patch", "a1", "mail", "files", "v2", "0", "x"], 2))
        assert make_snippet(body, hl) == make_snippet(body, hl, fast=False), (body, hl)
