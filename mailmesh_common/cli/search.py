"""`mailmesh search reindex|query|status`: operating the search service over gRPC (system calls
carrying the mesh token from the data dir). Users are named by address and resolved to ids by
the mailbox service.

    mailmesh search reindex [--user EMAIL]       rebuild documents from the mailbox (all users by default)
    mailmesh search query --user EMAIL QUERY     run a query as an operator (newest first; --relevance)
    mailmesh search status [--user EMAIL]        backend, documents, events not yet indexed
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from google.protobuf import json_format
from mailmesh.v1 import search_service_pb2 as pb

from mailmesh_common.cli.command import Mesh, add_command, add_group, call, command

TIMEOUT_S = 30.0
REINDEX_TIMEOUT_S = 7 * 86_400.0


@command("search reindex")
def search_reindex(args: argparse.Namespace) -> int:
    async def go(m: Mesh) -> pb.ReindexResponse:
        if args.user:
            req = pb.ReindexRequest(parent=f"users/{await m.user_id(args.user, TIMEOUT_S)}")
        else:
            req = pb.ReindexRequest(all_users=True)
        last = pb.ReindexResponse()
        async for p in m.search.Reindex(req, timeout=REINDEX_TIMEOUT_S):
            last = p
            if not args.quiet and not p.done:
                print(f"\r{p.users_done} users, {p.documents} documents", end="", file=sys.stderr, flush=True)
        if not args.quiet:
            print(file=sys.stderr)
        return last

    r = call(args, go)
    print(f"reindexed {r.users_done} user(s): {r.documents} documents, {r.removed_documents} stale removed")
    return 0


@command("search query")
def search_query(args: argparse.Namespace) -> int:
    order = pb.SEARCH_ORDER_RELEVANCE if args.relevance else pb.SEARCH_ORDER_NEWEST_FIRST

    async def go(m: Mesh) -> pb.SearchResponse:
        user = await m.user_id(args.user, TIMEOUT_S)
        return await m.search.Search(pb.SearchRequest(parent=f"users/{user}", query=args.query, order=order,
                                                      page_size=args.limit, page_token=args.page_token or ""),
                                     timeout=TIMEOUT_S)

    r = call(args, go)
    if args.json:
        print(json.dumps(json_format.MessageToDict(r), indent=2))
        return 0
    for x in r.results:
        when = datetime.fromtimestamp(x.internal_date.seconds, UTC).strftime("%Y-%m-%d %H:%M")
        print(f"{when}\t{x.message_id}\t{x.thread_id}\t{x.snippet[:100]}")
    more = f"; next page: --page-token {r.next_page_token}" if r.next_page_token else ""
    print(f"{len(r.results)} shown of about {r.result_size_estimate}{more}", file=sys.stderr)
    return 0


@command("search status")
def search_status(args: argparse.Namespace) -> int:
    async def go(m: Mesh) -> pb.GetIndexStatusResponse:
        parent = f"users/{await m.user_id(args.user, TIMEOUT_S)}" if args.user else ""
        return await m.search.GetIndexStatus(pb.GetIndexStatusRequest(parent=parent), timeout=TIMEOUT_S)

    r = call(args, go)
    print(f"backend {r.backend}\tdocuments {r.documents}\tpending events {r.pending_events}")
    if r.rebuilding:
        print(f"rebuilding ({r.rebuild_reason}): {r.rebuild_users_done} of {r.rebuild_users_total} users, "
              f"{r.rebuild_documents} documents; searches answer UNAVAILABLE until it is done")
    return 0


def add_search_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Registers `mailmesh search ...`; each subcommand sets `func(args) -> int`."""
    srch = add_group(sub, "search", "the search index")
    p = add_command(srch, "reindex", search_reindex, "rebuild search documents from the mailbox (every user by default)")
    p.add_argument("--user", metavar="EMAIL", help="only this user")
    p.add_argument("--quiet", action="store_true", help="no progress on standard error")
    p = add_command(srch, "query", search_query, "run a Gmail-style query on a user's mail")
    p.add_argument("query", help='e.g. \'from:alice has:attachment after:2024/01/01 -"out of office"\'')
    p.add_argument("--user", metavar="EMAIL", required=True)
    p.add_argument("--relevance", action="store_true", help="best match first (default: newest first)")
    p.add_argument("--limit", type=int, default=20, help="results per page (max 500)")
    p.add_argument("--page-token", help="continue after a previous page")
    p.add_argument("--json", action="store_true")
    p = add_command(srch, "status", search_status, "backend, documents and indexing backlog")
    p.add_argument("--user", metavar="EMAIL", help="count this user's documents")


__all__ = ["add_search_commands"]
