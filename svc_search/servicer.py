"""SearchService over gRPC: resource names and authorization in, protobuf out. The work is in
search.py (queries), reindex.py (reindexing), rebuild.py (rebuilding a lost index at start) and
indexer.py (status)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from mailmesh.v1 import search_service_pb2 as pb
from mailmesh.v1 import search_service_pb2_grpc as pb_grpc

from mailmesh_common.auth import acting_user, user_from_parent
from mailmesh_common.errors import InvalidInput, PermissionDenied
from svc_search.indexer import Indexer
from svc_search.rebuild import Rebuilder
from svc_search.reindex import Reindexer
from svc_search.search import SearchEngine

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def system_only(what: str) -> None:
    """Administrative calls may not be made on behalf of a user."""
    if acting_user() is not None:
        raise PermissionDenied(f"{what} is an administrative call")


class SearchServicer(pb_grpc.SearchServiceServicer):
    def __init__(self, engine: SearchEngine, reindexer: Reindexer, indexer: Indexer | None,
                 rebuilder: Rebuilder | None = None) -> None:
        self.engine = engine
        self.reindexer = reindexer
        self.indexer = indexer
        self.rebuilder = rebuilder

    async def Search(self, request: pb.SearchRequest, context: Ctx) -> pb.SearchResponse:
        return await self.engine.search(user_from_parent(request.parent), request)

    async def Reindex(self, request: pb.ReindexRequest, context: Ctx) -> AsyncIterator[pb.ReindexResponse]:
        system_only("Reindex")
        if request.all_users == bool(request.parent):
            raise InvalidInput("give either parent or all_users")
        users = None if request.all_users else [user_from_parent(request.parent)]
        done = 0
        async for p in self.reindexer.run(users):
            if p.users_done > done:  # p.user_id is complete again
                done = p.users_done
                if self.rebuilder is not None:
                    self.rebuilder.reindexed(p.user_id)
            yield pb.ReindexResponse(user_id=p.user_id, documents=p.documents, removed_documents=p.removed,
                                     users_done=p.users_done, done=p.done)

    async def GetIndexStatus(self, request: pb.GetIndexStatusRequest, context: Ctx) -> pb.GetIndexStatusResponse:
        if request.parent:
            user: str | None = user_from_parent(request.parent)
        else:
            system_only("GetIndexStatus of every user")
            user = None
        backend = self.engine.backend
        pending = await self.indexer.pending() if self.indexer is not None else 0
        r = pb.GetIndexStatusResponse(backend=backend.name, documents=await backend.count(user),
                                      pending_events=pending)
        if self.rebuilder is not None:
            st = self.rebuilder.status
            r.rebuilding, r.rebuild_reason = st.rebuilding, st.reason
            r.rebuild_users_done, r.rebuild_users_total, r.rebuild_documents = (st.users_done, st.users_total,
                                                                                st.documents)
        return r


def service_name() -> Any:
    return pb.DESCRIPTOR.services_by_name["SearchService"].full_name
