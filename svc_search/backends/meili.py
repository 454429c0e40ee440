"""The distributed backend: Meilisearch through its official Python client.

Used when MAILMESH_MEILI_URL is set; several comma-separated URLs are shards, and each user
lives on one shard chosen by rendezvous hashing of the user id (stable: adding a shard moves
only the users it wins; moved users need `mailmesh search reindex`). One index per shard
(INDEX_UID), its settings applied at start.

Exactness (the answer is tantivy's, or an error):
- matching is done by the filter, not by `q`: each text field is also stored as the array of
  its distinct analyzed tokens (t_from ... t_filename, filterable), so a word is an exact
  `t_body = "word"` clause and the query's boolean structure is the filter's;
- phrases cannot be checked by a filter: the filter then matches a superset and every hit is
  checked in svc_search (compile.evaluate) before it is returned;
- pagination settings raise maxTotalHits, searches use page/hitsPerPage (exhaustive counts)
  and a result count at the ceiling is an error, never a truncated answer;
- newest-first pages continue from a (date, tie) cursor in the filter, never a deep offset;
- writes are split into requests under MAX_PAYLOAD_BYTES (the server refuses larger ones), and
  return once every task succeeded (tasks of one index run in the order they were enqueued);
- relevance order uses `q` only to rank, and checks that `q` kept every filtered document
  (two exhaustive counts); if it did not, the query is refused (FailedPrecondition).
Every value in a filter is a quoted, escaped string or an integer (compile.meili_string).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import meilisearch
from meilisearch.errors import MeilisearchApiError, MeilisearchCommunicationError, MeilisearchTimeoutError

from mailmesh_common.errors import FailedPrecondition, LimitExceeded, MailmeshError, Unavailable
from svc_search.backends.base import Backend, Cursor, Hit, Key, Order, Page, newest_next
from svc_search.documents import TEXT_FIELDS, SearchDocument
from svc_search.query.ast import PAll, Plan, PNone
from svc_search.query.compile import (
    FALSE,
    TRUE,
    DocTokens,
    evaluate,
    meili_string,
    meili_words,
    term_attr,
    to_meili,
)
from svc_search.text import tokens

log = logging.getLogger(__name__)
T = TypeVar("T")

INDEX_UID = "mailmesh_messages"
MAX_TOTAL_HITS = 100_000_000
TASK_TIMEOUT_MS = 120_000
SCAN_PAGE = 200  # candidates fetched per request when hits must be checked in svc_search
_ID_OK = re.compile(r"^[A-Za-z0-9_-]{1,400}$")
_USER_OK = re.compile(r"^[A-Za-z0-9_]+$")
# bytes of JSON per add-documents request: well under Meilisearch's default 100 MB payload limit
MAX_PAYLOAD_BYTES = 32_000_000
SEARCHABLE = ["subject", "from_text", "to_text", "cc_text", "bcc_text", "filename_text", "body"]
FILTERABLE = ["user", "id", "labels", "date", "tie", "size", "unread", "starred", "has_attachment", "modseq",
              "generation", *(term_attr(f) for f in TEXT_FIELDS)]
SETTINGS: dict[str, Any] = {
    "searchableAttributes": SEARCHABLE,
    "filterableAttributes": FILTERABLE,
    "sortableAttributes": ["date", "tie"],
    "typoTolerance": {"enabled": False},
    "pagination": {"maxTotalHits": MAX_TOTAL_HITS},
}
RETRIEVE = ["src", "body"]


def doc_id(key: Key) -> str:
    """The Meilisearch primary key of a document (ids are limited to [A-Za-z0-9_-], 511 bytes).

    "<user>-<message>" when the user id has no "-" (so the first "-" ends it and no two keys
    share an id); otherwise "h" + a SHA-256 of both (no "-", so never equal to the first form)."""
    raw = f"{key[0]}-{key[1]}"
    if _USER_OK.match(key[0]) and _ID_OK.match(raw):
        return raw
    return "h" + hashlib.sha256(f"{key[0]}\0{key[1]}".encode()).hexdigest()


def _payload_chunks(docs: list[dict[str, Any]], budget: int) -> list[list[dict[str, Any]]]:
    """`docs` in consecutive chunks whose JSON stays under `budget` bytes (a larger document
    goes alone), so no request exceeds the server's payload limit."""
    chunks: list[list[dict[str, Any]]] = []
    cur: list[dict[str, Any]] = []
    size = 2
    for d in docs:
        n = len(json.dumps(d, ensure_ascii=False).encode()) + 1
        if cur and size + n > budget:
            chunks.append(cur)
            cur, size = [], 2
        cur.append(d)
        size += n
    if cur:
        chunks.append(cur)
    return chunks


def shard_for(user: str, urls: Sequence[str]) -> int:
    """Rendezvous (highest random weight) hashing of a user over the shard URLs."""
    best, best_w = 0, b""
    for i, url in enumerate(urls):
        w = hashlib.sha256(f"{url.rstrip('/')}\0{user}".encode()).digest()
        if w > best_w:
            best, best_w = i, w
    return best


def to_meili_doc(doc: SearchDocument) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": doc_id(doc.key), "user": doc.user, "message_id": doc.message_id, "thread_id": doc.thread_id,
        "labels": list(doc.labels), "date": doc.date, "tie": doc.tie, "size": doc.size,
        "unread": doc.unread, "starred": doc.starred, "has_attachment": doc.has_attachment,
        "modseq": doc.modseq, "generation": doc.generation,
        "subject": doc.subject, "body": doc.body,
        "src": replace(doc, body="").to_json(),
    }
    for name in ("from", "to", "cc", "bcc", "filename"):
        out[f"{name}_text"] = doc.text(name)
    for name in TEXT_FIELDS:
        out[term_attr(name)] = sorted(set(tokens(doc.text(name))))
    return out


def from_meili_hit(hit: dict[str, Any]) -> SearchDocument:
    return replace(SearchDocument.from_json(hit["src"]), body=hit.get("body") or "")


def _filter_ids(keys: Sequence[Key]) -> str:
    return "id IN [" + ", ".join(meili_string(doc_id(k)) for k in keys) + "]"


class MeiliBackend(Backend):
    name = "meilisearch"

    def __init__(self, urls: Sequence[str], api_key: str = "", timeout_s: int = 30,
                 max_payload_bytes: int = MAX_PAYLOAD_BYTES) -> None:
        if not urls:
            raise ValueError("no Meilisearch URL")
        self.max_payload_bytes = max_payload_bytes
        self.created_shards: set[int] = set()  # shards whose index `start` had to create
        self.urls = [u.rstrip("/") for u in urls]
        self.clients = [meilisearch.Client(u, api_key or None, timeout=timeout_s) for u in self.urls]
        self.indexes = [c.index(INDEX_UID) for c in self.clients]

    # --- plumbing
    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (MeilisearchCommunicationError, MeilisearchTimeoutError) as exc:
            raise Unavailable(f"Meilisearch not reachable: {exc.__class__.__name__}") from exc
        except MeilisearchApiError as exc:
            if exc.status_code and int(exc.status_code) >= 500:
                raise Unavailable(f"Meilisearch error: {exc.code}") from exc
            log.error("Meilisearch rejected a request: %s %s", exc.code, exc.message)
            raise MailmeshError(f"search backend rejected the request ({exc.code})") from exc

    async def _wait(self, shard: int, task_uid: int) -> dict[str, Any]:
        task = await self._call(self.clients[shard].wait_for_task, task_uid, TASK_TIMEOUT_MS, 20)
        if task.status != "succeeded":
            err = task.error or {}
            raise Unavailable(f"Meilisearch task {task_uid} {task.status}: {err.get('code', '')}")
        return dict(task.details or {})

    def shard(self, user: str) -> int:
        return shard_for(user, self.urls)

    # --- lifecycle
    async def start(self) -> None:
        self.created_shards.clear()
        for i, client in enumerate(self.clients):
            await self._call(client.health)
            try:
                info = await self._call(client.create_index, INDEX_UID, {"primaryKey": "id"})
                await self._wait(i, info.task_uid)
                self.created_shards.add(i)
            except Unavailable as exc:
                if "index_already_exists" not in exc.message:
                    raise
            info = await self._call(self.indexes[i].update_settings, dict(SETTINGS))
            await self._wait(i, info.task_uid)

    @property
    def created(self) -> bool:
        return bool(self.created_shards)

    @property
    def rebuild_reason(self) -> str:
        # a shard whose index had to be created lost its users' documents (a new or wiped
        # server); a rebuild interrupted by a stop is not remembered here (run a reindex)
        return "index missing" if self.created else ""

    def needs_rebuild(self, user: str) -> bool:
        return self.shard(user) in self.created_shards

    # --- reads
    async def get(self, keys: Sequence[Key]) -> dict[Key, SearchDocument]:
        by_user: dict[str, list[Key]] = defaultdict(list)
        for k in keys:
            by_user[k[0]].append(k)
        out: dict[Key, SearchDocument] = {}
        for user, ks in by_user.items():  # the user filter here too, although ids embed the user
            res = await self._call(self.indexes[self.shard(user)].get_documents, {
                "filter": f"user = {meili_string(user)} AND {_filter_ids(ks)}", "limit": len(ks),
                "fields": RETRIEVE})
            for d in res.results:
                doc = from_meili_hit(dict(d))
                if doc.user == user:
                    out[doc.key] = doc
        return out

    def _base_filter(self, user: str, plan_expr: str, cursor: Cursor | None, newest: bool) -> str:
        parts = [f"user = {meili_string(user)}"]
        if plan_expr != TRUE:
            parts.append(plan_expr)
        if newest and cursor is not None:
            parts.append(f"(date < {int(cursor.date)} OR (date = {int(cursor.date)} AND tie <= {int(cursor.tie)}))")
        return " AND ".join(parts)

    async def _search_raw(self, shard: int, q: str, params: dict[str, Any]) -> dict[str, Any]:
        res = await self._call(self.indexes[shard].search, q, params)
        total = int(res.get("totalHits", res.get("estimatedTotalHits", 0)) or 0)
        if total >= MAX_TOTAL_HITS:
            raise LimitExceeded("the query matches more documents than Meilisearch counts exactly")
        return res

    async def search(self, user: str, plan: Plan, order: Order, page_size: int,
                     cursor: Cursor | None) -> Page:
        if not user:
            raise ValueError("a search needs a user")
        if isinstance(plan, PNone):
            return Page([], 0, None)
        f = to_meili(plan) if not isinstance(plan, PAll) else None
        expr = f.expr if f else TRUE
        if expr == FALSE:
            return Page([], 0, None)
        exact = f.exact if f else True
        shard = self.shard(user)
        if order == Order.NEWEST:
            return await self._newest(shard, user, plan, expr, exact, page_size, cursor)
        return await self._relevance(shard, user, plan, expr, exact, page_size, cursor)

    async def _newest(self, shard: int, user: str, plan: Plan, expr: str, exact: bool, page_size: int,
                      cursor: Cursor | None) -> Page:
        filt = self._base_filter(user, expr, cursor, newest=True)
        seen = set(cursor.seen) if cursor else set()
        per_page = page_size + len(seen) + 1 if exact else max(SCAN_PAGE, page_size + len(seen) + 1)
        hits: list[Hit] = []
        skipped = 0
        total = 0
        page_no = 1
        cache = DocTokens()
        while True:
            res = await self._search_raw(shard, "", {
                "filter": filt, "sort": ["date:desc", "tie:desc"], "hitsPerPage": per_page, "page": page_no,
                "attributesToRetrieve": RETRIEVE})
            total = int(res.get("totalHits", 0))
            for raw in res.get("hits", []):
                doc = from_meili_hit(raw)
                if doc.user != user:  # defence in depth: the filter already guarantees it
                    continue
                if cursor and doc.message_id in seen and doc.sort_key == (cursor.date, cursor.tie):
                    skipped += 1
                    continue
                if not exact and not evaluate(plan, doc, cache):
                    skipped += 1
                    continue
                hits.append(Hit(doc))
            exhausted = page_no >= int(res.get("totalPages", 0) or 0)
            if exact or exhausted or len(hits) > page_size:
                break
            page_no += 1
        page = hits[:page_size]
        more = len(hits) > page_size
        if exact:
            remaining = max(0, total - skipped)
        else:
            remaining = len(hits) if exhausted and not more else max(len(hits), total - skipped)
        return Page(page, remaining, newest_next(cursor, page) if more and page else None)

    async def _relevance(self, shard: int, user: str, plan: Plan, expr: str, exact: bool, page_size: int,
                         cursor: Cursor | None) -> Page:
        filt = self._base_filter(user, expr, None, newest=False)
        q = " ".join(meili_words(plan))
        offset = cursor.offset if cursor else 0
        if q:
            counts = await self._call(self.clients[shard].multi_search, [
                {"indexUid": INDEX_UID, "q": "", "filter": filt, "hitsPerPage": 1, "page": 1},
                {"indexUid": INDEX_UID, "q": q, "filter": filt, "hitsPerPage": 1, "page": 1,
                 "matchingStrategy": "all"},
            ])
            n_filter, n_q = (int(r.get("totalHits", 0)) for r in counts["results"])
            if n_filter >= MAX_TOTAL_HITS:
                raise LimitExceeded("the query matches more documents than Meilisearch counts exactly")
            if n_filter != n_q:
                raise FailedPrecondition(
                    "relevance order cannot be computed exactly for this query on Meilisearch "
                    "(its words do not select every match); search newest first")
        hits: list[Hit] = []
        cache = DocTokens()
        consumed = offset
        total = 0
        while True:
            batch = page_size + 1 if exact else max(SCAN_PAGE, page_size + 1)
            res = await self._search_raw(shard, q, {
                "filter": filt, "offset": consumed, "limit": batch, "matchingStrategy": "all",
                "showRankingScore": True, "attributesToRetrieve": RETRIEVE})
            raw_hits = res.get("hits", [])
            total = int(res.get("estimatedTotalHits", 0) or 0)
            for raw in raw_hits:
                consumed += 1
                doc = from_meili_hit(raw)
                if doc.user != user or (not exact and not evaluate(plan, doc, cache)):
                    continue
                hits.append(Hit(doc, float(raw.get("_rankingScore", 0.0))))
                if len(hits) > page_size:
                    consumed -= 1  # the extra hit starts the next page
                    break
            if exact or len(hits) > page_size or len(raw_hits) < batch:
                break
        page = hits[:page_size]
        more = len(hits) > page_size
        if exact:
            consumed = offset + len(page)
        return Page(page, max(len(page), total - offset), Cursor(offset=consumed) if more else None)

    async def count(self, user: str | None) -> int:
        if user is None:
            total = 0
            for idx in self.indexes:
                stats = await self._call(idx.get_stats)
                total += int(stats.number_of_documents)
            return total
        res = await self._search_raw(self.shard(user), "", {"filter": f"user = {meili_string(user)}",
                                                            "hitsPerPage": 1, "page": 1})
        return int(res.get("totalHits", 0))

    # --- writes
    async def write(self, upserts: Sequence[SearchDocument], deletes: Sequence[Key]) -> None:
        adds: dict[int, list[dict[str, Any]]] = defaultdict(list)
        dels: dict[int, list[Key]] = defaultdict(list)
        for doc in upserts:
            adds[self.shard(doc.user)].append(to_meili_doc(doc))
        for key in deletes:
            dels[self.shard(key[0])].append(key)
        tasks: list[tuple[int, int]] = []
        for shard, keys in dels.items():
            info = await self._call(self.indexes[shard].delete_documents, filter=_filter_ids(keys))
            tasks.append((shard, info.task_uid))
        for shard, docs in adds.items():
            for chunk in _payload_chunks(docs, self.max_payload_bytes):
                info = await self._call(self.indexes[shard].add_documents, chunk, "id")
                tasks.append((shard, info.task_uid))
        for shard, uid in tasks:
            await self._wait(shard, uid)

    async def delete_stale(self, user: str, generation: int, max_modseq: int) -> int:
        shard = self.shard(user)
        filt = (f"user = {meili_string(user)} AND generation < {int(generation)} "
                f"AND modseq <= {int(max_modseq)}")
        info = await self._call(self.indexes[shard].delete_documents, filter=filt)
        details = await self._wait(shard, info.task_uid)
        return int(details.get("deletedDocuments", 0) or 0)
