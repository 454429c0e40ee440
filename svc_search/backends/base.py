"""The one interface every search backend implements, and the page cursor they share.

A backend stores SearchDocuments keyed by (user, message id) and answers a plan (see
query/ast.py) for ONE user: `search` takes the user as a separate, mandatory argument and adds
the user filter to every query it runs, so no plan, cursor or document field can widen it.
`write` returns only once the change is durable and visible to searches (the indexer acks
events after it returns).

Order:
- NEWEST: by (date, tie) descending, where tie is a stable hash of the message id; a page
  starts at the cursor's (date, tie) inclusive, skipping the ids already returned with exactly
  that key, so inserts between pages never repeat or skip a result.
- RELEVANCE: by the backend's score; a page starts after `offset` hits.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from svc_search.documents import SearchDocument
from svc_search.query.ast import Plan

Key = tuple[str, str]  # (user, message id)


class Order(enum.Enum):
    NEWEST = "newest"
    RELEVANCE = "relevance"


@dataclass(frozen=True)
class Cursor:
    """Where a page starts (see the module docstring)."""

    date: int = 0
    tie: int = 0
    seen: tuple[str, ...] = ()
    offset: int = 0


@dataclass(frozen=True)
class Hit:
    """One result; `doc.body` may be only the head of the body (enough for a snippet)."""

    doc: SearchDocument
    score: float = 0.0


@dataclass
class Page:
    """One page of hits, the number of documents matching from the cursor on (`remaining`,
    at least the hits returned; for an over-approximating backend an upper bound), and the
    cursor of the next page (None on the last page)."""

    hits: list[Hit]
    remaining: int
    next: Cursor | None = None
    notes: list[str] = field(default_factory=list)


def newest_next(prev: Cursor | None, page_hits: Sequence[Hit]) -> Cursor:
    """The NEWEST cursor after `page_hits` (non-empty, in order)."""
    last = page_hits[-1].doc
    seen = [h.doc.message_id for h in page_hits if h.doc.sort_key == last.sort_key]
    if prev is not None and (prev.date, prev.tie) == last.sort_key:
        seen = list(prev.seen) + seen
    return Cursor(date=last.date, tie=last.tie, seen=tuple(dict.fromkeys(seen)))


class Backend(abc.ABC):
    """A search index. Implementations: tantivy (embedded), Meilisearch (distributed)."""

    name: str = ""

    async def start(self) -> None:
        """Opens the index and applies its settings; raises Unavailable when it cannot."""
        return None

    async def close(self) -> None:
        """Releases the index (pending writes were already committed by `write`)."""
        return None

    @property
    def created(self) -> bool:
        """True when `start` found no usable index and created an empty one."""
        return False

    @property
    def rebuild_reason(self) -> str:
        """Why the documents must be rebuilt from the mailbox store, as found by `start` (the
        index was missing, unreadable, of another schema, or a rebuild was interrupted); ""
        when the index is intact."""
        return ""

    def needs_rebuild(self, user: str) -> bool:
        """Whether a rebuild for `rebuild_reason` concerns `user` (Meilisearch: only the users
        of the shards whose index was lost)."""
        return True

    async def begin_rebuild(self, reason: str) -> None:
        """Records durably that a rebuild is running, so that `start` reports it again if the
        process stops before `end_rebuild`."""
        return None

    async def end_rebuild(self) -> None:
        """Records that the rebuild finished (every user's documents were written)."""
        return None

    @abc.abstractmethod
    async def get(self, keys: Sequence[Key]) -> dict[Key, SearchDocument]:
        """The stored documents of these keys (missing keys are absent)."""

    @abc.abstractmethod
    async def write(self, upserts: Sequence[SearchDocument], deletes: Sequence[Key]) -> None:
        """Replaces or adds `upserts` and removes `deletes`; returns once durable and visible."""

    @abc.abstractmethod
    async def search(self, user: str, plan: Plan, order: Order, page_size: int,
                     cursor: Cursor | None) -> Page:
        """One page of `user`'s documents matching `plan`."""

    @abc.abstractmethod
    async def count(self, user: str | None) -> int:
        """Documents of `user`, or of every user when None."""

    @abc.abstractmethod
    async def delete_stale(self, user: str, generation: int, max_modseq: int) -> int:
        """Removes `user`'s documents written before reindex `generation` and reflecting no
        change after `max_modseq` (messages gone from the mailbox); returns how many."""
