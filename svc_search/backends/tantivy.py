"""The embedded backend: one tantivy index on disk under {data_dir}/search.

One writer (tantivy allows one per index; a lock file keeps a second process out) runs on its
own thread; `write` deletes and adds documents by their "key" term, commits (fsync) and reloads
the searchers before it returns, so an acked event is durable and searchable. Searches run on
worker threads. Every query is `user:<user> AND <plan> [AND cursor]` built as tantivy Query
objects (compile.to_tantivy); the query parser is never used.

At start the index is checked: a missing index is created empty; an unreadable one (corrupt or
missing files) or one of another schema version is moved aside (to search.old, replacing an
older one) and created empty. Either way `rebuild_reason` says why its documents must be rebuilt
from the mailbox store (svc_search.rebuild does that in the background); a marker file
(REBUILD_MARKER) records a running rebuild, so one interrupted by a stop is started again.
An index locked by another process is not touched: start fails with Unavailable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import tantivy
from tantivy import Occur, Query

from mailmesh_common.errors import Unavailable
from svc_search.backends.base import Backend, Cursor, Hit, Key, Order, Page, newest_next
from svc_search.documents import TEXT_FIELDS, TIE_MOD, SearchDocument
from svc_search.query.ast import PAll, Plan, PNone
from svc_search.query.compile import to_tantivy
from svc_search.snippets import SCAN_CHARS, SNIPPET_CHARS
from svc_search.text import TOKENIZER, analyzer

log = logging.getLogger(__name__)

SCHEMA_VERSION = "2"
SCHEMA_MARKER = "mailmesh-schema"
REBUILD_MARKER = "mailmesh-rebuild"
WRITER_HEAP_BYTES = 96_000_000
U64_MAX = (1 << 64) - 1
# search hits carry the head of their body only: enough for snippets (see snippets.SCAN_CHARS)
HIT_BODY_BYTES = 4 * (SCAN_CHARS + SNIPPET_CHARS + 400)


def build_schema() -> tantivy.Schema:
    sb = tantivy.SchemaBuilder()
    sb.add_text_field("user", tokenizer_name="raw")
    sb.add_text_field("key", tokenizer_name="raw")
    for name in TEXT_FIELDS:
        sb.add_text_field(name, tokenizer_name=TOKENIZER, index_option="position")
    sb.add_text_field("labels", tokenizer_name="raw")
    for name in ("date", "size", "modseq", "generation"):
        sb.add_unsigned_field(name, indexed=True, fast=True)
    sb.add_unsigned_field("sk", indexed=True, fast=True)  # date * TIE_MOD + tie: newest-first order
    for name in ("unread", "starred", "has_attachment"):
        sb.add_boolean_field(name, indexed=True)
    sb.add_bytes_field("src", stored=True)  # the document as JSON, without its body
    sb.add_bytes_field("bodytext", stored=True)  # the body, UTF-8 (read whole or just its head)
    return sb.build()


def key_term(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


def sort_value(doc: SearchDocument) -> int:
    return doc.date * TIE_MOD + doc.tie


def to_tantivy_doc(doc: SearchDocument) -> tantivy.Document:
    d = tantivy.Document()
    d.add_text("user", doc.user)
    d.add_text("key", key_term(doc.key))
    for name in TEXT_FIELDS:
        text = doc.text(name)
        if text:
            d.add_text(name, text)
    for label in doc.labels:
        d.add_text("labels", label)
    d.add_unsigned("date", doc.date)
    d.add_unsigned("size", doc.size)
    d.add_unsigned("modseq", doc.modseq)
    d.add_unsigned("generation", doc.generation)
    d.add_unsigned("sk", sort_value(doc))
    d.add_boolean("unread", doc.unread)
    d.add_boolean("starred", doc.starred)
    d.add_boolean("has_attachment", doc.has_attachment)
    d.add_bytes("src", replace(doc, body="").to_bytes())
    d.add_bytes("bodytext", doc.body.encode())
    return d


def from_stored(stored: tantivy.Document, body_bytes: int | None = None) -> SearchDocument:
    """The document from its stored fields; with `body_bytes`, only the head of the body."""
    doc = SearchDocument.from_bytes(stored["src"][0])
    raw = stored["bodytext"][0]
    if body_bytes is not None:
        raw = raw[:body_bytes]
    return replace(doc, body=raw.decode("utf-8", errors="ignore"))


class TantivyBackend(Backend):
    name = "tantivy"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.schema = build_schema()
        self._created = False
        self._reason = ""
        self._index: tantivy.Index | None = None
        self._writer: tantivy.IndexWriter | None = None
        self._wpool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tantivy-writer")

    @property
    def created(self) -> bool:
        return self._created

    # --- lifecycle
    def _open_existing(self) -> tuple[tantivy.Index, tantivy.IndexWriter]:
        index = tantivy.Index(self.schema, path=str(self.path), reuse=True)
        index.register_tokenizer(TOKENIZER, analyzer())
        searcher = index.searcher()  # opens every segment: missing or damaged files fail here
        searcher.search(Query.all_query(), 1, count=True)
        return index, index.writer(WRITER_HEAP_BYTES, 1)

    def _set_aside(self, why: str) -> None:
        aside = self.path.with_name(self.path.name + ".old")
        shutil.rmtree(aside, ignore_errors=True)
        self.path.rename(aside)
        log.warning("search index at %s %s: moved to %s; it will be rebuilt from the mailbox", self.path, why, aside)

    def _open(self) -> None:
        marker = self.path / SCHEMA_MARKER
        reason = ""
        if self.path.exists() and (self.path / REBUILD_MARKER).exists():
            was = (self.path / REBUILD_MARKER).read_text(errors="replace").strip()[:200]
            reason = f"a rebuild was interrupted ({was})" if was else "a rebuild was interrupted"
        if not self.path.exists() or not tantivy.Index.exists(str(self.path)):
            reason = reason or "index missing"
        elif not marker.exists() or (found := marker.read_text().strip()) != SCHEMA_VERSION:
            reason = f"index schema changed (found {found if marker.exists() else 'none'}, " \
                     f"want {SCHEMA_VERSION})"
            self._set_aside("has another schema")
        else:
            try:
                self._index, self._writer = self._open_existing()
            except ValueError as exc:
                if "LockBusy" in str(exc) or "lock" in str(exc).lower():
                    raise Unavailable("the search index is in use by another process") from exc
                reason = "index unreadable"
                self._set_aside(f"is unreadable ({str(exc)[:300]})")
        self._created = self._index is None
        if self._index is None:
            self.path.mkdir(parents=True, exist_ok=True)
            index = tantivy.Index(self.schema, path=str(self.path), reuse=False)
            index.register_tokenizer(TOKENIZER, analyzer())
            self._index, self._writer = index, index.writer(WRITER_HEAP_BYTES, 1)
            if reason != "index missing":  # known to need a rebuild even if we stop before it starts
                self._write_marker(REBUILD_MARKER, reason)
        self._write_marker(SCHEMA_MARKER, SCHEMA_VERSION)
        self._reason = reason

    def _write_marker(self, name: str, text: str) -> None:
        tmp = self.path / (name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)

    @property
    def rebuild_reason(self) -> str:
        return self._reason

    async def begin_rebuild(self, reason: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._wpool, self._write_marker, REBUILD_MARKER, reason)

    def _end_rebuild(self) -> None:
        (self.path / REBUILD_MARKER).unlink(missing_ok=True)
        self._reason = ""

    async def end_rebuild(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._wpool, self._end_rebuild)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._wpool, self._open)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"cannot open the search index: {exc}") from exc

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._wpool, writer.wait_merging_threads)  # releases the lock
        self._wpool.shutdown(wait=True)

    @property
    def index(self) -> tantivy.Index:
        if self._index is None:
            raise Unavailable("the search index is not open")
        return self._index

    # --- reads
    def _docs(self, query: tantivy.Query, limit: int) -> list[SearchDocument]:
        searcher = self.index.searcher()
        res = searcher.search(query, limit, count=False)
        return [from_stored(searcher.doc(addr)) for _, addr in res.hits]

    async def get(self, keys: Sequence[Key]) -> dict[Key, SearchDocument]:
        if not keys:
            return {}
        q = tantivy.Query.term_set_query(self.schema, "key", [key_term(k) for k in keys])
        docs = await asyncio.to_thread(self._docs, q, len(keys))
        return {d.key: d for d in docs}

    def _user_query(self, user: str, plan: Plan, cursor_sk: int | None) -> tantivy.Query:
        clauses = [(Occur.Must, Query.term_query(self.schema, "user", user))]
        if not isinstance(plan, PAll):
            clauses.append((Occur.Must, to_tantivy(plan, self.schema)))
        if cursor_sk is not None:
            clauses.append((Occur.Must, Query.range_query(self.schema, "sk", tantivy.FieldType.Unsigned, 0, cursor_sk)))
        return Query.boolean_query(clauses)

    def _search(self, user: str, plan: Plan, order: Order, page_size: int, cursor: Cursor | None) -> Page:
        searcher = self.index.searcher()
        if order == Order.NEWEST:
            sk = cursor.date * TIE_MOD + cursor.tie if cursor else None
            seen = set(cursor.seen) if cursor else set()
            q = self._user_query(user, plan, sk)
            res = searcher.search(q, page_size + len(seen) + 1, count=True, order_by_field="sk",
                                  order=tantivy.Order.Desc)
            hits = []
            for _, addr in res.hits:
                doc = from_stored(searcher.doc(addr), HIT_BODY_BYTES)
                if doc.message_id in seen and cursor and doc.sort_key == (cursor.date, cursor.tie):
                    continue
                hits.append(Hit(doc))
            remaining = max(0, _count_of(res) - (len(res.hits) - len(hits)))
            page = hits[:page_size]
            nxt = newest_next(cursor, page) if len(hits) > page_size and page else None
            return Page(page, remaining, nxt)
        offset = cursor.offset if cursor else 0
        q = self._user_query(user, plan, None)
        res = searcher.search(q, page_size + 1, count=True, offset=offset)
        hits = [Hit(from_stored(searcher.doc(addr), HIT_BODY_BYTES), float(score)) for score, addr in res.hits]
        page = hits[:page_size]
        nxt = Cursor(offset=offset + len(page)) if len(hits) > page_size else None
        return Page(page, max(0, _count_of(res) - offset), nxt)

    async def search(self, user: str, plan: Plan, order: Order, page_size: int,
                     cursor: Cursor | None) -> Page:
        if not user:
            raise ValueError("a search needs a user")
        if isinstance(plan, PNone):
            return Page([], 0, None)
        return await asyncio.to_thread(self._search, user, plan, order, page_size, cursor)

    def _count(self, user: str | None) -> int:
        searcher = self.index.searcher()
        if user is None:
            return int(searcher.num_docs)
        res = searcher.search(tantivy.Query.term_query(self.schema, "user", user), 1, count=True)
        return _count_of(res)

    async def count(self, user: str | None) -> int:
        return await asyncio.to_thread(self._count, user)

    # --- writes
    def _write(self, upserts: Sequence[SearchDocument], deletes: Sequence[Key]) -> None:
        writer = self._writer
        if writer is None:
            raise Unavailable("the search index is closed")
        try:
            for key in {*deletes, *(d.key for d in upserts)}:
                writer.delete_documents_by_term("key", key_term(key))
            for doc in upserts:
                writer.add_document(to_tantivy_doc(doc))
            writer.commit()
        except Exception:
            writer.rollback()
            raise
        self.index.reload()

    async def write(self, upserts: Sequence[SearchDocument], deletes: Sequence[Key]) -> None:
        if not upserts and not deletes:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._wpool, self._write, upserts, deletes)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"search index write failed: {exc}") from exc

    def _delete_stale(self, user: str, generation: int, max_modseq: int) -> int:
        writer = self._writer
        if writer is None:
            raise Unavailable("the search index is closed")
        U = tantivy.FieldType.Unsigned  # noqa: N806
        q = Query.boolean_query([
            (Occur.Must, Query.term_query(self.schema, "user", user)),
            (Occur.Must, Query.range_query(self.schema, "generation", U, 0, max(0, generation - 1))),
            (Occur.Must, Query.range_query(self.schema, "modseq", U, 0, max(0, max_modseq))),
        ])
        n = _count_of(self.index.searcher().search(q, 1, count=True))
        if n:
            writer.delete_documents_by_query(q)
            writer.commit()
            self.index.reload()
        return n

    async def delete_stale(self, user: str, generation: int, max_modseq: int) -> int:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._wpool, self._delete_stale, user, generation, max_modseq)


def _count_of(res: tantivy.SearchResult) -> int:
    """The hit count of a search made with count=True (absent from tantivy's type stubs)."""
    return int(getattr(res, "count", 0) or 0)
