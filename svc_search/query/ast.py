"""The two trees of a query.

The syntax tree (`Node`) is what the user wrote, as parsed: words, phrases, operators with
validated values, negation, AND, OR. It knows nothing of labels or of the current time.

The plan (`P...`) is what to look for, after compile.resolve: label names are label ids,
relative dates are absolute, SPAM/TRASH exclusion is explicit, words are analyzed tokens. Every
backend compiles the plan (never the user's text) into its own query form, and
compile.evaluate runs it over one document in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- syntax tree ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """Base of the syntax tree; `pos` is the 0-based offset of the node in the query text."""

    pos: int


@dataclass(frozen=True)
class Text(Node):
    """A bare word, a "phrase", or the value of from: to: cc: bcc: subject: filename:."""

    field: str | None  # None: any text field
    text: str
    quoted: bool = False


@dataclass(frozen=True)
class HasAttachment(Node):
    """has:attachment."""


@dataclass(frozen=True)
class Is(Node):
    """is:unread, is:read, is:starred, is:important."""

    flag: str


@dataclass(frozen=True)
class InLabel(Node):
    """in:NAME or label:NAME (NAME as written; "anywhere" lifts the SPAM/TRASH exclusion)."""

    name: str


@dataclass(frozen=True)
class DateBound(Node):
    """after:DATE (on or after its midnight, UTC) or before:DATE (before its midnight)."""

    op: str  # "after" | "before"
    epoch: int  # seconds since the epoch, UTC


@dataclass(frozen=True)
class Relative(Node):
    """older_than:N<unit> or newer_than:N<unit>, unit d (days), m (months) or y (years)."""

    op: str  # "older_than" | "newer_than"
    amount: int
    unit: str


@dataclass(frozen=True)
class Size(Node):
    """larger:N or smaller:N (N in bytes; K and M suffixes are 1024 and 1024²)."""

    op: str  # "larger" | "smaller"
    size: int


@dataclass(frozen=True)
class Not(Node):
    child: Node


@dataclass(frozen=True)
class And(Node):
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Or(Node):
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Everything(Node):
    """The empty query: every message (SPAM and TRASH excepted, as always)."""


# --- plan -------------------------------------------------------------------------------------


class Plan:
    """Base of the plan nodes."""


@dataclass(frozen=True)
class PTerm(Plan):
    """Tokens found in one of `fields`: one token is a word, several a phrase (consecutive, in
    one field)."""

    fields: tuple[str, ...]
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class PLabel(Plan):
    label_id: str


@dataclass(frozen=True)
class PFlag(Plan):
    """A boolean field of the document: "unread", "starred" or "has_attachment"."""

    name: str
    value: bool


@dataclass(frozen=True)
class PRange(Plan):
    """An integer field ("date" in epoch seconds, "size" in bytes) within [lo, hi] (inclusive;
    None is unbounded)."""

    field: str
    lo: int | None
    hi: int | None


@dataclass(frozen=True)
class PAnd(Plan):
    children: tuple[Plan, ...]


@dataclass(frozen=True)
class POr(Plan):
    children: tuple[Plan, ...]


@dataclass(frozen=True)
class PNot(Plan):
    child: Plan


@dataclass(frozen=True)
class PAll(Plan):
    """Every document."""


@dataclass(frozen=True)
class PNone(Plan):
    """No document."""
