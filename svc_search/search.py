"""A search for one user, from the request to the response: parse the query, resolve it
(labels and from:me are asked of the mailbox only when the query needs them), run it on the
backend with the user as the mandatory filter, and build results with snippets."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from mailmesh.v1 import search_service_pb2 as pb

from mailmesh_common.errors import InvalidInput
from mailmesh_common.mailboxclient import MailboxClient
from svc_search.backends.base import Backend, Order
from svc_search.documents import SearchDocument
from svc_search.pagetoken import PageState, PageTokens
from svc_search.query import compile as qc
from svc_search.query.ast import Plan
from svc_search.query.parser import parse
from svc_search.rebuild import Rebuilder
from svc_search.snippets import make_snippet

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
ORDERS = {pb.SEARCH_ORDER_UNSPECIFIED: Order.NEWEST, pb.SEARCH_ORDER_NEWEST_FIRST: Order.NEWEST,
          pb.SEARCH_ORDER_RELEVANCE: Order.RELEVANCE}


@dataclass
class Resolved:
    plan: Plan
    now: int


class SearchEngine:
    def __init__(self, backend: Backend, mailbox: MailboxClient, tokens: PageTokens,
                 rebuilder: Rebuilder | None = None) -> None:
        self.backend = backend
        self.mailbox = mailbox
        self.tokens = tokens
        self.rebuilder = rebuilder

    async def plan(self, user: str, query: str, now: int | None = None) -> Resolved:
        """The plan of `query` for `user` (raises QuerySyntaxError for a malformed query)."""
        node = parse(query)
        when = int(time.time()) if now is None else now
        ctx = qc.Context(now=when)
        wanted = qc.needs(node)
        if "labels" in wanted:
            ctx.labels = [(lab.id, lab.name) for lab in await self.mailbox.list_labels(user)]
        if "me" in wanted:
            ctx.my_addresses = list((await self.mailbox.get_account(user)).addresses)
        return Resolved(qc.resolve(node, ctx), when)

    async def search(self, user: str, request: pb.SearchRequest) -> pb.SearchResponse:
        order = ORDERS.get(request.order)
        if order is None:
            raise InvalidInput(f"order: unknown value {request.order}")
        if request.page_size < 0:
            raise InvalidInput("page_size must not be negative")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        state = self.tokens.decode(request.page_token, user, request.query, order) if request.page_token else None
        resolved = await self.plan(user, request.query, state.now if state else None)
        if self.rebuilder is not None:
            self.rebuilder.check(user)  # never a partial answer from an index being rebuilt
        page = await self.backend.search(user, resolved.plan, order, page_size, state.cursor if state else None)
        returned = state.returned if state else 0
        highlight = qc.highlight_tokens(resolved.plan)
        results = await asyncio.to_thread(self._results, [h.doc for h in page.hits],
                                          [h.score for h in page.hits], highlight, order)
        token = ""
        if page.next is not None:
            token = self.tokens.encode(user, request.query, order,
                                       PageState(resolved.now, page.next, returned + len(results)))
        return pb.SearchResponse(results=results, next_page_token=token,
                                 result_size_estimate=returned + page.remaining)

    @staticmethod
    def _results(docs: list[SearchDocument], scores: list[float], highlight: set[str],
                 order: Order) -> list[pb.SearchResult]:
        out = []
        for doc, score in zip(docs, scores, strict=True):
            snippet, ranges = make_snippet(doc.body, highlight)
            r = pb.SearchResult(message_id=doc.message_id, thread_id=doc.thread_id, snippet=snippet,
                                score=score if order == Order.RELEVANCE else 0.0)
            r.highlights.extend(pb.TextRange(start=a, end=b) for a, b in ranges)
            r.internal_date.seconds = doc.date
            out.append(r)
        return out
