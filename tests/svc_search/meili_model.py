"""An in-memory model of the parts of Meilisearch (and of its official Python client) that the
Meilisearch backend uses, so the backend's own logic — documents, settings, filters, cursors,
exact-count checks, checking hits of inexact filters — runs through the contract suite without
a server. It follows the documented behaviour: filters (=, !=, <, <=, >, >=, IN, NOT, AND, OR,
parentheses; NOT binds tighter than AND, AND than OR; string comparison case-insensitive; an
array attribute matches when any element does), only filterable/sortable attributes may be
used, page/hitsPerPage counts are exhaustive up to pagination.maxTotalHits (default 1000),
offset/limit give an estimate, and a filter on an attribute that is not filterable is an error.

It is a model, not Meilisearch: relevance is a plain word count. The real server runs the same
suite when MAILMESH_MEILI_URL is set.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from meilisearch.errors import MeilisearchApiError

from svc_search.text import tokens

_servers: dict[str, FakeServer] = {}
# Meilisearch refuses larger requests (413 payload_too_large); its default is 100 MB, the model's is
# smaller so that the contract suite exercises the driver's splitting of large writes
PAYLOAD_LIMIT_BYTES = 2_000_000


class _Resp:
    def __init__(self, status: int, body: str) -> None:
        self.status_code = status
        self.text = body

    def json(self) -> dict[str, Any]:
        import json

        return dict(json.loads(self.text))


def _api_error(code: str, message: str, status: int = 400) -> MeilisearchApiError:
    import json

    return MeilisearchApiError(message, _Resp(status, json.dumps({"code": code, "message": message})))  # type: ignore[arg-type]


@dataclass
class Task:
    task_uid: int
    status: str
    error: dict[str, Any] | None = None
    details: dict[str, Any] | None = None


@dataclass
class FakeIndex:
    uid: str
    primary_key: str = "id"
    docs: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


class FakeServer:
    def __init__(self) -> None:
        self.indexes: dict[str, FakeIndex] = {}
        self.tasks: dict[int, Task] = {}
        self.ids = itertools.count(1)
        self.filters: list[str] = []  # the filter of every search and document fetch, in order

    def task(self, status: str = "succeeded", error: dict[str, Any] | None = None,
             details: dict[str, Any] | None = None) -> Task:
        t = Task(next(self.ids), status, error, details)
        self.tasks[t.task_uid] = t
        return t


# --- filters -------------------------------------------------------------------------------------

_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<op>>=|<=|!=|=|<|>)|(?P<p>[()\[\],])|(?P<w>[^\s()\[\],=<>!"]+))')


def _lex(expr: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if not m:
            raise _api_error("invalid_search_filter", f"cannot parse filter at {pos}: {expr[pos:pos + 20]!r}")
        pos = m.end()
        if m.group("str") is not None:
            out.append(("value", re.sub(r"\\(.)", r"\1", m.group("str")[1:-1])))
        elif m.group("op"):
            out.append(("op", m.group("op")))
        elif m.group("p"):
            out.append((m.group("p"), m.group("p")))
        else:
            out.append(("word", m.group("w")))
    return out


class _Filter:
    def __init__(self, expr: str, filterable: set[str]) -> None:
        self.toks = _lex(expr)
        self.i = 0
        self.filterable = filterable
        self.node = self.or_()
        if self.i != len(self.toks):
            raise _api_error("invalid_search_filter", f"unexpected {self.toks[self.i]}")

    def peek(self) -> tuple[str, Any] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, Any]:
        t = self.peek()
        if t is None:
            raise _api_error("invalid_search_filter", "unexpected end of filter")
        self.i += 1
        return t

    def or_(self) -> Any:
        parts = [self.and_()]
        while self.peek() == ("word", "OR"):
            self.take()
            parts.append(self.and_())
        return ("or", parts)

    def and_(self) -> Any:
        parts = [self.not_()]
        while self.peek() == ("word", "AND"):
            self.take()
            parts.append(self.not_())
        return ("and", parts)

    def not_(self) -> Any:
        if self.peek() == ("word", "NOT"):
            self.take()
            return ("not", self.not_())
        if self.peek() == ("(", "("):
            self.take()
            node = self.or_()
            if self.take() != (")", ")"):
                raise _api_error("invalid_search_filter", "expected )")
            return node
        kind, attr = self.take()
        if kind != "word":
            raise _api_error("invalid_search_filter", f"expected an attribute, got {attr!r}")
        if attr not in self.filterable:
            raise _api_error("invalid_search_filter", f"attribute {attr} is not filterable")
        kind, op = self.take()
        if kind == "word" and op == "IN":
            if self.take() != ("[", "["):
                raise _api_error("invalid_search_filter", "expected [")
            values = []
            while True:
                values.append(self.value())
                t = self.take()
                if t == ("]", "]"):
                    break
                if t != (",", ","):
                    raise _api_error("invalid_search_filter", "expected , or ]")
            return ("in", attr, values)
        if kind != "op":
            raise _api_error("invalid_search_filter", f"expected an operator after {attr}")
        return ("cmp", attr, op, self.value())

    def value(self) -> Any:
        kind, v = self.take()
        if kind == "value":
            return v
        if kind == "word":
            if re.fullmatch(r"-?\d+(\.\d+)?", v):
                return float(v)
            return v
        raise _api_error("invalid_search_filter", f"expected a value, got {v!r}")

    def match(self, doc: dict[str, Any], node: Any = None) -> bool:
        node = self.node if node is None else node
        kind = node[0]
        if kind == "or":
            return any(self.match(doc, n) for n in node[1])
        if kind == "and":
            return all(self.match(doc, n) for n in node[1])
        if kind == "not":
            return not self.match(doc, node[1])
        if kind == "in":
            return any(_cmp(doc.get(node[1]), "=", v) for v in node[2])
        return _cmp(doc.get(node[1]), node[2], node[3])


def _cmp(value: Any, op: str, want: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or isinstance(want, str) and want in ("true", "false"):
            ok = str(v).lower() == str(want).lower() if op in ("=", "!=") else False
            if op == "!=":
                ok = not ok
        elif isinstance(v, (int, float)) and isinstance(want, float):
            ok = {"=": v == want, "!=": v != want, "<": v < want, "<=": v <= want, ">": v > want,
                  ">=": v >= want}[op]
        elif isinstance(v, str) and isinstance(want, str):
            ok = {"=": v.lower() == want.lower(), "!=": v.lower() != want.lower()}.get(op, False)
        else:
            ok = op == "!="
        if ok:
            return True
    return False


# --- the client ----------------------------------------------------------------------------------

class FakeIndexHandle:
    def __init__(self, server: FakeServer, uid: str) -> None:
        self.server = server
        self.uid = uid

    def _index(self) -> FakeIndex:
        idx = self.server.indexes.get(self.uid)
        if idx is None:
            raise _api_error("index_not_found", f"index {self.uid} not found", 404)
        return idx

    def update_settings(self, body: dict[str, Any]) -> Task:
        self._index().settings.update(body)
        return self.server.task()

    def _filter(self, expr: Any) -> _Filter | None:
        if not expr:
            return None
        return _Filter(str(expr), set(self._index().settings.get("filterableAttributes", [])))

    def add_documents(self, docs: list[dict[str, Any]], primary_key: str | None = None) -> Task:
        import json

        if len(json.dumps(docs).encode()) > PAYLOAD_LIMIT_BYTES:
            raise _api_error("payload_too_large", "The provided payload reached the size limit.", 413)
        idx = self._index()
        for d in docs:
            idx.docs[str(d[primary_key or idx.primary_key])] = dict(d)
        return self.server.task(details={"indexedDocuments": len(docs)})

    def delete_documents(self, ids: Any = None, *, filter: str | None = None) -> Task:  # noqa: A002
        idx = self._index()
        f = self._filter(filter)
        gone = [k for k, d in idx.docs.items() if f is not None and f.match(d)]
        for k in gone:
            del idx.docs[k]
        return self.server.task(details={"deletedDocuments": len(gone)})

    def get_documents(self, parameters: dict[str, Any]) -> Any:
        self.server.filters.append(str(parameters.get("filter", "")))
        f = self._filter(parameters.get("filter"))
        found = [d for d in self._index().docs.values() if f is None or f.match(d)][: parameters.get("limit", 20)]
        fields = parameters.get("fields")
        out = [{k: v for k, v in d.items() if not fields or k in fields} for d in found]

        class Results:
            results = out

        return Results()

    def get_stats(self) -> Any:
        class Stats:
            number_of_documents = len(self._index().docs)

        return Stats()

    def search(self, q: str, params: dict[str, Any]) -> dict[str, Any]:
        self.server.filters.append(str(params.get("filter", "")))
        idx = self._index()
        settings = idx.settings
        f = self._filter(params.get("filter"))
        docs = [d for d in idx.docs.values() if f is None or f.match(d)]
        if q:
            words = [w for w in re.findall(r'"[^"]*"|\S+', q)]
            searchable = settings.get("searchableAttributes", ["*"])

            def text(d: dict[str, Any]) -> list[str]:
                return tokens(" ".join(str(d.get(a, "")) for a in searchable))

            def hit(d: dict[str, Any]) -> int:
                toks = text(d)
                n = 0
                for w in words:
                    seq = tokens(w.strip('"'))
                    if not seq or not any(toks[i:i + len(seq)] == seq for i in range(len(toks))):
                        return 0
                    n += sum(1 for i in range(len(toks)) if toks[i:i + len(seq)] == seq)
                return n

            scored = [(hit(d), d) for d in docs]
            docs = [d for s, d in sorted(scored, key=lambda x: -x[0]) if s > 0]
            scores = {id(d): s for s, d in scored}
        else:
            scores = {}
        for spec in reversed(params.get("sort") or []):
            attr, _, direction = spec.partition(":")
            if attr not in settings.get("sortableAttributes", []):
                raise _api_error("invalid_search_sort", f"attribute {attr} is not sortable")
            docs.sort(key=lambda d, a=attr: d.get(a, 0), reverse=direction == "desc")
        cap = int(settings.get("pagination", {}).get("maxTotalHits", 1000))
        docs = docs[:cap]
        fields = params.get("attributesToRetrieve")

        def shown(d: dict[str, Any]) -> dict[str, Any]:
            out = {k: v for k, v in d.items() if not fields or k in fields}
            if params.get("showRankingScore"):
                out["_rankingScore"] = float(scores.get(id(d), 1))
            return out

        if "hitsPerPage" in params or "page" in params:
            per = int(params.get("hitsPerPage", 20))
            page = int(params.get("page", 1))
            chunk = docs[(page - 1) * per: page * per] if per else []
            return {"hits": [shown(d) for d in chunk], "totalHits": len(docs),
                    "totalPages": -(-len(docs) // per) if per else 0, "page": page, "hitsPerPage": per}
        off, lim = int(params.get("offset", 0)), int(params.get("limit", 20))
        return {"hits": [shown(d) for d in docs[off:off + lim]], "estimatedTotalHits": len(docs),
                "offset": off, "limit": lim}


class FakeClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: int | None = None) -> None:
        self.server = _servers.setdefault(url.rstrip("/"), FakeServer())

    def health(self) -> dict[str, str]:
        return {"status": "available"}

    def index(self, uid: str) -> FakeIndexHandle:
        return FakeIndexHandle(self.server, uid)

    def create_index(self, uid: str, options: dict[str, Any]) -> Task:
        if uid in self.server.indexes:
            return self.server.task("failed", {"code": "index_already_exists"})
        self.server.indexes[uid] = FakeIndex(uid, options.get("primaryKey", "id"))
        return self.server.task()

    def wait_for_task(self, uid: int, timeout_in_ms: int = 5000, interval_in_ms: int = 50) -> Task:
        return self.server.tasks[uid]

    def multi_search(self, queries: list[dict[str, Any]]) -> dict[str, Any]:
        results = []
        for q in queries:
            params = {k: v for k, v in q.items() if k not in ("indexUid", "q")}
            results.append(self.index(q["indexUid"]).search(q.get("q", ""), params))
        return {"results": results}


def reset() -> None:
    _servers.clear()


def server(url: str) -> FakeServer:
    return _servers[url.rstrip("/")]
