"""`mailmesh search reindex|query|status`: operating the search service over gRPC (system calls
carrying the mesh token from the data dir). Users are named by address and resolved to ids by
the mailbox service.

    mailmesh search reindex [--user EMAIL]       rebuild documents from the mailbox (all users by default)
    mailmesh search query --user EMAIL QUERY     run a query as an operator (newest first; --relevance)
    mailmesh search status [--user EMAIL]        backend, documents, events not yet indexed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import grpc
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import mailbox_service_pb2_grpc as mpb_grpc
from mailmesh.v1 import search_service_pb2 as pb
from mailmesh.v1 import search_service_pb2_grpc as pb_grpc

from mailmesh_common import auth
from mailmesh_common.cli.status import read_endpoints
from mailmesh_common.config import Settings, load_settings

T = TypeVar("T")
TIMEOUT_S = 30.0
REINDEX_TIMEOUT_S = 7 * 86_400.0


class _Stubs:
    def __init__(self, mailbox: grpc.aio.Channel, search: grpc.aio.Channel, token: str) -> None:
        self.mailbox = mpb_grpc.MailboxServiceStub(mailbox)
        self.search = pb_grpc.SearchServiceStub(search)
        self.md = ((auth.TOKEN_KEY, token),)

    async def user_id(self, email: str) -> str:
        r = await self.mailbox.GetAccount(mpb.GetAccountRequest(email=email), metadata=self.md, timeout=TIMEOUT_S)
        return str(r.account.user_id)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None), data_dir=getattr(args, "data_dir", None))


def _call(args: argparse.Namespace, fn: Callable[[_Stubs], Awaitable[T]]) -> T:
    settings = _settings(args)
    endpoints = read_endpoints(settings.data_dir) or {}
    mailbox = endpoints.get("svc_mailbox") or settings.addr("mailbox")
    search = endpoints.get("svc_search") or settings.addr("search")

    async def go() -> T:
        async with grpc.aio.insecure_channel(mailbox) as mch, grpc.aio.insecure_channel(search) as sch:
            return await fn(_Stubs(mch, sch, settings.token()))

    return asyncio.run(go())


def _fail(exc: grpc.aio.AioRpcError, what: str) -> int:
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        print(f"mailmesh: {what}: a service is not reachable (is `mailmesh up` running?)", file=sys.stderr)
    else:
        print(f"mailmesh: {what}: {exc.details()} ({exc.code().name})", file=sys.stderr)
    return 1


def search_reindex(args: argparse.Namespace) -> int:
    async def go(s: _Stubs) -> pb.ReindexResponse:
        if args.user:
            req = pb.ReindexRequest(parent=f"users/{await s.user_id(args.user)}")
        else:
            req = pb.ReindexRequest(all_users=True)
        last = pb.ReindexResponse()
        async for p in s.search.Reindex(req, metadata=s.md, timeout=REINDEX_TIMEOUT_S):
            last = p
            if not args.quiet and not p.done:
                print(f"\r{p.users_done} users, {p.documents} documents", end="", file=sys.stderr, flush=True)
        if not args.quiet:
            print(file=sys.stderr)
        return last

    try:
        r = _call(args, go)
    except grpc.aio.AioRpcError as exc:
        return _fail(exc, "search reindex")
    print(f"reindexed {r.users_done} user(s): {r.documents} documents, {r.removed_documents} stale removed")
    return 0


def search_query(args: argparse.Namespace) -> int:
    order = pb.SEARCH_ORDER_RELEVANCE if args.relevance else pb.SEARCH_ORDER_NEWEST_FIRST

    async def go(s: _Stubs) -> pb.SearchResponse:
        user = await s.user_id(args.user)
        return await s.search.Search(pb.SearchRequest(parent=f"users/{user}", query=args.query, order=order,
                                                      page_size=args.limit, page_token=args.page_token or ""),
                                     metadata=s.md, timeout=TIMEOUT_S)

    try:
        r = _call(args, go)
    except grpc.aio.AioRpcError as exc:
        return _fail(exc, "search query")
    if args.json:
        from google.protobuf import json_format

        print(json.dumps(json_format.MessageToDict(r), indent=2))
        return 0
    for x in r.results:
        when = datetime.fromtimestamp(x.internal_date.seconds, UTC).strftime("%Y-%m-%d %H:%M")
        print(f"{when}\t{x.message_id}\t{x.thread_id}\t{x.snippet[:100]}")
    more = f"; next page: --page-token {r.next_page_token}" if r.next_page_token else ""
    print(f"{len(r.results)} shown of about {r.result_size_estimate}{more}", file=sys.stderr)
    return 0


def search_status(args: argparse.Namespace) -> int:
    async def go(s: _Stubs) -> pb.GetIndexStatusResponse:
        parent = f"users/{await s.user_id(args.user)}" if args.user else ""
        return await s.search.GetIndexStatus(pb.GetIndexStatusRequest(parent=parent), metadata=s.md,
                                             timeout=TIMEOUT_S)

    try:
        r = _call(args, go)
    except grpc.aio.AioRpcError as exc:
        return _fail(exc, "search status")
    print(f"backend {r.backend}\tdocuments {r.documents}\tpending events {r.pending_events}")
    if r.rebuilding:
        print(f"rebuilding ({r.rebuild_reason}): {r.rebuild_users_done} of {r.rebuild_users_total} users, "
              f"{r.rebuild_documents} documents; searches answer UNAVAILABLE until it is done")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="data dir of the running mesh (for its internal token)")
    p.add_argument("--config", help="TOML settings file")


def add_search_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Registers `mailmesh search ...`; each subcommand sets `func(args) -> int`."""
    srch = sub.add_parser("search", help="the search index")
    ssub = srch.add_subparsers(dest="search_command", metavar="COMMAND")
    p = ssub.add_parser("reindex", help="rebuild search documents from the mailbox (every user by default)")
    p.add_argument("--user", metavar="EMAIL", help="only this user")
    p.add_argument("--quiet", action="store_true", help="no progress on standard error")
    _common(p)
    p.set_defaults(func=search_reindex)
    p = ssub.add_parser("query", help="run a Gmail-style query on a user's mail")
    p.add_argument("query", help='e.g. \'from:alice has:attachment after:2024/01/01 -"out of office"\'')
    p.add_argument("--user", metavar="EMAIL", required=True)
    p.add_argument("--relevance", action="store_true", help="best match first (default: newest first)")
    p.add_argument("--limit", type=int, default=20, help="results per page (max 500)")
    p.add_argument("--page-token", help="continue after a previous page")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=search_query)
    p = ssub.add_parser("status", help="backend, documents and indexing backlog")
    p.add_argument("--user", metavar="EMAIL", help="count this user's documents")
    _common(p)
    p.set_defaults(func=search_status)
    srch.set_defaults(func=lambda _a: (srch.print_help(sys.stderr), 2)[1])


__all__ = ["add_search_commands"]
