"""Wires svc_search. Today: the gRPC health endpoint and stream provisioning; the indexer and
SearchService land with the search issue."""

from __future__ import annotations

from mailmesh_common.service import ServiceContext, main


async def register(ctx: ServiceContext) -> None:
    return None


def run() -> None:
    main("svc_search", "search_port", register)
