"""From the syntax tree to a plan, and from the plan to each backend's query.

`resolve` turns the syntax tree into a plan (ast.P*): words become analyzed tokens (the same
analyzer as the documents), label names become label ids (case- and accent-insensitive, spaces
and slashes as `-`, as Gmail does), relative dates become absolute, and SPAM and TRASH are
excluded unless the query names them or says in:anywhere. Then:

- `to_tantivy` builds a tantivy Query object tree (no query string is ever parsed, so no
  user text can be read as tantivy syntax);
- `to_meili` builds a Meilisearch filter expression in which every value is a quoted, escaped
  string or an integer, with an over-approximation flag: phrases cannot be checked by a filter,
  so a plan with phrases yields a filter matching a superset, and svc_search checks each hit
  with `evaluate` (exact results, never a silently different answer);
- `evaluate` runs the plan over one document in Python (the reference semantics).

The user filter is not part of the plan: each backend adds it to every query it runs.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import tantivy
from tantivy import Occur, Query

from svc_search.documents import TEXT_FIELDS, SearchDocument
from svc_search.query import ast
from svc_search.query.ast import PAll, PAnd, PFlag, PLabel, Plan, PNone, PNot, POr, PRange, PTerm
from svc_search.text import tokens

ADDRESS_FIELDS = ("from", "to", "cc", "bcc")
SYSTEM_LABELS = {
    "inbox": "INBOX", "sent": "SENT", "draft": "DRAFTS", "drafts": "DRAFTS", "spam": "SPAM",
    "trash": "TRASH", "bin": "TRASH", "starred": "STARRED", "important": "IMPORTANT",
}
EXCLUDED = ("SPAM", "TRASH")


# --- what a query needs from outside ----------------------------------------------------------

def needs(node: ast.Node) -> set[str]:
    """"labels" when the query names a label that is not a system label; "me" when it says
    from:me (or to:/cc:/bcc:me)."""
    out: set[str] = set()
    for n in _walk(node):
        if isinstance(n, ast.InLabel) and label_key(n.name) not in SYSTEM_LABELS and \
                label_key(n.name) not in ("anywhere", "unread", "read", ""):
            out.add("labels")
        if isinstance(n, ast.Text) and n.field in ADDRESS_FIELDS and not n.quoted and n.text.lower() == "me":
            out.add("me")
    return out


def _walk(node: ast.Node) -> Iterable[ast.Node]:
    yield node
    if isinstance(node, ast.Not):
        yield from _walk(node.child)
    elif isinstance(node, (ast.And, ast.Or)):
        for c in node.children:
            yield from _walk(c)


def label_key(name: str) -> str:
    """How label names compare: tokens joined by '-' ("Work/Big Projects" → "work-big-projects")."""
    return "-".join(tokens(name))


# --- resolve --------------------------------------------------------------------------------

@dataclass
class Context:
    """What resolving needs: the time, the user's labels (id, name) and the user's addresses."""

    now: int
    labels: Sequence[tuple[str, str]] = ()
    my_addresses: Sequence[str] = ()
    mentioned: set[str] = field(default_factory=set)


def resolve(node: ast.Node, ctx: Context) -> Plan:
    """The plan of a syntax tree for one user, SPAM/TRASH exclusion included."""
    plan = _resolve(node, ctx)
    body: Plan = plan if plan is not None else PAll()
    exclusions: list[Plan] = [PNot(PLabel(x)) for x in EXCLUDED if x not in ctx.mentioned]
    return simplify(PAnd((body, *exclusions)))


def _resolve(node: ast.Node, ctx: Context) -> Plan | None:
    if isinstance(node, ast.Everything):
        return None
    if isinstance(node, ast.Text):
        return _text(node, ctx)
    if isinstance(node, ast.HasAttachment):
        return PFlag("has_attachment", True)
    if isinstance(node, ast.Is):
        return {"unread": PFlag("unread", True), "read": PFlag("unread", False),
                "starred": PFlag("starred", True), "important": PLabel("IMPORTANT")}[node.flag]
    if isinstance(node, ast.InLabel):
        return _label(node.name, ctx)
    if isinstance(node, ast.DateBound):
        return PRange("date", node.epoch, None) if node.op == "after" else PRange("date", None, node.epoch - 1)
    if isinstance(node, ast.Relative):
        cutoff = _cutoff(ctx.now, node.amount, node.unit)
        return PRange("date", None, cutoff - 1) if node.op == "older_than" else PRange("date", cutoff, None)
    if isinstance(node, ast.Size):
        return PRange("size", node.size + 1, None) if node.op == "larger" else PRange("size", None, node.size - 1)
    if isinstance(node, ast.Not):
        child = _resolve(node.child, ctx)
        return None if child is None else PNot(child)
    if isinstance(node, (ast.And, ast.Or)):
        kids = [p for p in (_resolve(c, ctx) for c in node.children) if p is not None]
        if not kids:
            return None
        return PAnd(tuple(kids)) if isinstance(node, ast.And) else POr(tuple(kids))
    raise TypeError(f"unknown query node {node!r}")  # pragma: no cover


def _text(node: ast.Text, ctx: Context) -> Plan | None:
    fields = (node.field,) if node.field else TEXT_FIELDS
    if node.field in ADDRESS_FIELDS and not node.quoted and node.text.lower() == "me" and ctx.my_addresses:
        mine = [PTerm(fields, tuple(tokens(a))) for a in ctx.my_addresses if tokens(a)]
        return POr(tuple(mine)) if mine else None
    toks = tokens(node.text)
    if not toks:
        return None  # punctuation only: ignored, as Gmail does
    return PTerm(fields, tuple(toks))


def _label(name: str, ctx: Context) -> Plan:
    key = label_key(name)
    if key == "anywhere":
        ctx.mentioned.update(EXCLUDED)
        return PAll()
    if key in ("unread", "read"):
        return PFlag("unread", key == "unread")
    system = SYSTEM_LABELS.get(key)
    if system:
        ctx.mentioned.add(system)
        return PLabel(system)
    matches = [lid for lid, lname in ctx.labels if key and key in (label_key(lname), label_key(lid))]
    for lid in matches:
        ctx.mentioned.add(lid)
    if not matches:
        return PNone()  # no such label: nothing carries it
    return POr(tuple(PLabel(lid) for lid in dict.fromkeys(matches)))


def _cutoff(now: int, amount: int, unit: str) -> int:
    if unit == "d":
        return now - amount * 86_400
    t = datetime.fromtimestamp(now, UTC)
    months = amount * (12 if unit == "y" else 1)
    total = t.year * 12 + (t.month - 1) - months
    year, month = divmod(total, 12)
    if year < 1:
        return -(1 << 62)
    day = min(t.day, calendar.monthrange(year, month + 1)[1])
    return int(t.replace(year=year, month=month + 1, day=day).timestamp())


def simplify(plan: Plan) -> Plan:
    """Flattened, constant-folded plan (AND/OR of one child is that child, and so on)."""
    if isinstance(plan, PRange):
        lo = plan.lo if plan.lo is not None and plan.lo > 0 else None
        hi = plan.hi
        if hi is not None and (hi < 0 or (lo is not None and lo > hi)):
            return PNone()
        return PAll() if lo is None and hi is None else PRange(plan.field, lo, hi)
    if isinstance(plan, PNot):
        child = simplify(plan.child)
        if isinstance(child, PNot):
            return child.child
        if isinstance(child, PAll):
            return PNone()
        if isinstance(child, PNone):
            return PAll()
        return PNot(child)
    if isinstance(plan, (PAnd, POr)):
        is_and = isinstance(plan, PAnd)
        kids: list[Plan] = []
        for c in plan.children:
            s = simplify(c)
            if isinstance(s, type(plan)):
                kids.extend(s.children)  # type: ignore[attr-defined]
            elif isinstance(s, PAll if is_and else PNone):
                continue
            elif isinstance(s, PNone if is_and else PAll):
                return s
            elif s not in kids:
                kids.append(s)
        if not kids:
            return PAll() if is_and else PNone()
        if len(kids) == 1:
            return kids[0]
        return PAnd(tuple(kids)) if is_and else POr(tuple(kids))
    return plan


def highlight_tokens(plan: Plan) -> set[str]:
    """Tokens to highlight in body snippets: those of positive word and phrase terms."""
    out: set[str] = set()

    def walk(p: Plan, positive: bool) -> None:
        if isinstance(p, PTerm) and positive and "body" in p.fields:
            out.update(p.tokens)
        elif isinstance(p, PNot):
            walk(p.child, not positive)
        elif isinstance(p, (PAnd, POr)):
            for c in p.children:
                walk(c, positive)

    walk(plan, True)
    return out


def has_phrase(plan: Plan) -> bool:
    if isinstance(plan, PTerm):
        return len(plan.tokens) > 1
    if isinstance(plan, PNot):
        return has_phrase(plan.child)
    if isinstance(plan, (PAnd, POr)):
        return any(has_phrase(c) for c in plan.children)
    return False


# --- the reference semantics ------------------------------------------------------------------

class DocTokens:
    """Analyzed fields of documents, computed once per (document, field)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str], tuple[list[str], frozenset[str]]] = {}

    def get(self, doc: SearchDocument, name: str) -> tuple[list[str], frozenset[str]]:
        k = (id(doc), name)
        hit = self._cache.get(k)
        if hit is None:
            seq = tokens(doc.text(name))
            hit = (seq, frozenset(seq))
            self._cache[k] = hit
        return hit


def _contains_run(seq: list[str], run: tuple[str, ...]) -> bool:
    n = len(run)
    first = run[0]
    for i, t in enumerate(seq):
        if t == first and tuple(seq[i:i + n]) == run:
            return True
    return False


def evaluate(plan: Plan, doc: SearchDocument, cache: DocTokens | None = None) -> bool:
    """Whether `doc` matches `plan` (the user filter is the caller's)."""
    cache = cache or DocTokens()
    if isinstance(plan, PTerm):
        for f in plan.fields:
            seq, bag = cache.get(doc, f)
            if all(t in bag for t in plan.tokens) and (len(plan.tokens) == 1 or _contains_run(seq, plan.tokens)):
                return True
        return False
    if isinstance(plan, PLabel):
        return plan.label_id in doc.labels
    if isinstance(plan, PFlag):
        return bool(getattr(doc, plan.name)) == plan.value
    if isinstance(plan, PRange):
        v = doc.date if plan.field == "date" else doc.size
        return (plan.lo is None or v >= plan.lo) and (plan.hi is None or v <= plan.hi)
    if isinstance(plan, PAnd):
        return all(evaluate(c, doc, cache) for c in plan.children)
    if isinstance(plan, POr):
        return any(evaluate(c, doc, cache) for c in plan.children)
    if isinstance(plan, PNot):
        return not evaluate(plan.child, doc, cache)
    if isinstance(plan, PAll):
        return True
    if isinstance(plan, PNone):
        return False
    raise TypeError(f"unknown plan node {plan!r}")  # pragma: no cover


# --- tantivy -----------------------------------------------------------------------------------

U64_MAX = (1 << 64) - 1


def to_tantivy(plan: Plan, schema: tantivy.Schema) -> tantivy.Query:
    """A tantivy Query for the plan; values are passed as terms, never parsed."""
    if isinstance(plan, PTerm):
        if len(plan.tokens) == 1:
            qs = [Query.term_query(schema, f, plan.tokens[0]) for f in plan.fields]
        else:
            qs = [Query.phrase_query(schema, f, list(plan.tokens)) for f in plan.fields]
        return qs[0] if len(qs) == 1 else Query.boolean_query([(Occur.Should, q) for q in qs])
    if isinstance(plan, PLabel):
        return Query.term_query(schema, "labels", plan.label_id)
    if isinstance(plan, PFlag):
        return Query.term_query(schema, plan.name, plan.value)
    if isinstance(plan, PRange):
        lo = 0 if plan.lo is None else max(0, plan.lo)
        hi = U64_MAX if plan.hi is None else plan.hi
        return Query.range_query(schema, plan.field, tantivy.FieldType.Unsigned, lo, hi, True, True)
    if isinstance(plan, PAnd):
        clauses = [(Occur.MustNot, to_tantivy(c.child, schema)) if isinstance(c, PNot)
                   else (Occur.Must, to_tantivy(c, schema)) for c in plan.children]
        if all(o == Occur.MustNot for o, _ in clauses):
            clauses.insert(0, (Occur.Must, Query.all_query()))
        return Query.boolean_query(clauses)
    if isinstance(plan, POr):
        return Query.boolean_query([(Occur.Should, to_tantivy(c, schema)) for c in plan.children])
    if isinstance(plan, PNot):
        return Query.boolean_query([(Occur.Must, Query.all_query()), (Occur.MustNot, to_tantivy(plan.child, schema))])
    if isinstance(plan, PAll):
        return Query.all_query()
    if isinstance(plan, PNone):
        return Query.empty_query()
    raise TypeError(f"unknown plan node {plan!r}")  # pragma: no cover


# --- Meilisearch -------------------------------------------------------------------------------

TRUE = "TRUE"  # markers, never sent: folded away or turned into "no filter" / "no hit"
FALSE = "FALSE"


def meili_string(value: str) -> str:
    """A Meilisearch filter string literal: double-quoted, with \\ and " escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def term_attr(field_name: str) -> str:
    """The filterable attribute holding the distinct tokens of a text field."""
    return f"t_{field_name}"


def _and(parts: Sequence[str]) -> str:
    kept: list[str] = []
    for p in parts:
        if p == FALSE:
            return FALSE
        if p != TRUE and p not in kept:
            kept.append(p)
    if not kept:
        return TRUE
    return kept[0] if len(kept) == 1 else "(" + " AND ".join(kept) + ")"


def _or(parts: Sequence[str]) -> str:
    kept: list[str] = []
    for p in parts:
        if p == TRUE:
            return TRUE
        if p != FALSE and p not in kept:
            kept.append(p)
    if not kept:
        return FALSE
    return kept[0] if len(kept) == 1 else "(" + " OR ".join(kept) + ")"


def _not(p: str) -> str:
    if p == TRUE:
        return FALSE
    if p == FALSE:
        return TRUE
    return f"(NOT {p})"


def _meili(plan: Plan) -> tuple[str, str]:
    """(over, under): filters matching a superset and a subset of the plan's documents."""
    if isinstance(plan, PTerm):
        per_field = [_and([f"{term_attr(f)} = {meili_string(t)}" for t in plan.tokens]) for f in plan.fields]
        over = _or(per_field)
        return over, (over if len(plan.tokens) == 1 else FALSE)
    if isinstance(plan, PLabel):
        e = f"labels = {meili_string(plan.label_id)}"
        return e, e
    if isinstance(plan, PFlag):
        e = f"{plan.name} = {'true' if plan.value else 'false'}"
        return e, e
    if isinstance(plan, PRange):
        parts = []
        if plan.lo is not None:
            parts.append(f"{plan.field} >= {int(plan.lo)}")
        if plan.hi is not None:
            parts.append(f"{plan.field} <= {int(plan.hi)}")
        e = _and(parts)
        return e, e
    if isinstance(plan, (PAnd, POr)):
        pairs = [_meili(c) for c in plan.children]
        combine = _and if isinstance(plan, PAnd) else _or
        return combine([o for o, _ in pairs]), combine([u for _, u in pairs])
    if isinstance(plan, PNot):
        over, under = _meili(plan.child)
        return _not(under), _not(over)
    if isinstance(plan, PAll):
        return TRUE, TRUE
    if isinstance(plan, PNone):
        return FALSE, FALSE
    raise TypeError(f"unknown plan node {plan!r}")  # pragma: no cover


@dataclass(frozen=True)
class MeiliFilter:
    """A filter for Meilisearch: `expr` (TRUE: no filter; FALSE: nothing matches) and whether
    it is exact (otherwise every hit must be checked with `evaluate`)."""

    expr: str
    exact: bool


def to_meili(plan: Plan) -> MeiliFilter:
    over, under = _meili(plan)
    return MeiliFilter(over, over == under)


def meili_words(plan: Plan) -> list[str]:
    """Words for Meilisearch's `q` in relevance order: the tokens of positive words and phrases
    (phrases unquoted, so that `q` asks no more than the filter's over-approximation does)."""
    out: list[str] = []

    def walk(p: Plan, positive: bool) -> None:
        if isinstance(p, PTerm) and positive:
            out.extend(p.tokens)
        elif isinstance(p, PNot):
            walk(p.child, not positive)
        elif isinstance(p, (PAnd, POr)):
            for c in p.children:
                walk(c, positive)

    walk(plan, True)
    return list(dict.fromkeys(out))
