"""Wires svc_search: the search backend (tantivy under {data_dir}/search, or Meilisearch when
MAILMESH_MEILI_URL is set), the mailbox client, the EVENTS indexer, the background rebuild of a
lost index, and SearchService."""

from __future__ import annotations

import asyncio
import logging

from mailmesh.v1 import search_service_pb2_grpc as pb_grpc

from mailmesh_common.mailboxclient import MailboxClient
from mailmesh_common.service import ServiceContext, main
from svc_search.backends import open_backend
from svc_search.indexer import Indexer
from svc_search.pagetoken import PageTokens
from svc_search.rebuild import Rebuilder
from svc_search.reindex import Reindexer
from svc_search.search import SearchEngine
from svc_search.servicer import SearchServicer, service_name
from svc_search.store import DocStore

log = logging.getLogger(__name__)

MAILBOX_TIMEOUT_S = 15.0  # one call from svc_search to the mailbox service


async def register(ctx: ServiceContext) -> None:
    backend = open_backend(ctx.settings)
    await backend.start()
    ctx.closers.append(backend.close)
    mailbox = MailboxClient.connect(ctx.settings, timeout_s=MAILBOX_TIMEOUT_S)
    ctx.closers.append(mailbox.close)
    store = DocStore(backend)
    reindexer = Reindexer(store, mailbox)
    rebuilder = Rebuilder(backend, reindexer, mailbox)
    engine = SearchEngine(backend, mailbox, PageTokens(ctx.settings.token()), rebuilder)
    assert ctx.js is not None
    indexer = Indexer(store, mailbox, ctx.js)
    reason = backend.rebuild_reason
    if reason == "index missing" and not await indexer.consumer_existed():
        reason = ""  # a first start: the indexer reads EVENTS from the beginning
    if reason:
        rebuilder.mark_rebuilding(reason)  # before the first search can arrive
        task = asyncio.create_task(rebuilder.run(reason, ctx.stop), name="search-rebuild")
        ctx.tasks.append(task)
    elif backend.rebuild_reason:
        await backend.end_rebuild()
    ctx.components.update(backend=backend, store=store, engine=engine, reindexer=reindexer, indexer=indexer,
                          mailbox_client=mailbox, rebuilder=rebuilder)
    pb_grpc.add_SearchServiceServicer_to_server(SearchServicer(engine, reindexer, indexer, rebuilder),
                                                ctx.server.server)
    ctx.spawn(indexer.run(ctx.stop), "events-indexer")


def run() -> None:
    main("svc_search", "search_port", register, service_names=(service_name(),))
