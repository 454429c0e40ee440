"""svc_search running in this process next to a real svc_mailbox and nats-server: documents
arrive through the real EVENTS path (mailbox → changelog relay → JetStream → indexer).

`searchmesh` is shared by the tests of a module (each test makes its own domain and users);
`Search` has helpers to add mail, wait until the index has caught up, and query."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime

import grpc
import pytest
import pytest_asyncio
from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import search_service_pb2 as pb
from mailmesh.v1 import search_service_pb2_grpc as pb_grpc

from mailmesh_common.service import ServiceContext, run_until_stopped, serve
from svc_search.indexer import Indexer
from svc_search.server import register
from svc_search.servicer import service_name
from tests.svc_mailbox.conftest import (  # noqa: F401  (fixtures re-exported)
    Mesh,
    free_port,
    fresh_users,
    module_nats_url,
    nats_url,
    shared_mesh,
    start_mesh,
    stop_mesh,
)


def raw_message(subject: str = "Hello", body: str = "Hi there.", *, frm: str = "Carol <carol@remote.test>",
                to: str = "Alice <alice@example.com>", cc: str = "", bcc: str = "", html: str = "",
                attachments: Sequence[tuple[str, bytes]] = (), date: datetime | None = None,
                message_id: str = "") -> bytes:
    m = EmailMessage()
    m["From"] = frm
    m["To"] = to
    if cc:
        m["Cc"] = cc
    if bcc:
        m["Bcc"] = bcc
    m["Subject"] = subject
    m["Date"] = format_datetime(date or datetime(2024, 5, 1, 12, 0, tzinfo=UTC))
    m["Message-ID"] = message_id or f"<{time.monotonic_ns()}@test>"
    if html and not body:
        m.set_content(html, subtype="html")
    else:
        m.set_content(body)
        if html:
            m.add_alternative(html, subtype="html")
    for name, data in attachments:
        m.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return bytes(m)


@dataclass
class Search:
    mesh: Mesh
    ctx: ServiceContext
    channel: grpc.aio.Channel
    stub: pb_grpc.SearchServiceStub

    @property
    def indexer(self) -> Indexer:
        return self.ctx.components["indexer"]  # type: ignore[no-any-return]

    def md(self, user: str | None = None) -> tuple[tuple[str, str], ...]:
        return self.mesh.md(user)

    async def add(self, user: str, subject: str = "Hello", body: str = "Hi there.", *,
                  labels: Sequence[str] = ("INBOX",), unread: bool = True, starred: bool = False,
                  when: datetime | None = None, raw: bytes | None = None, **kw: object) -> str:
        """Appends a message (internal date `when`) and returns its id."""
        req = mpb.AppendMessageRequest(parent=f"users/{user}", raw=raw or raw_message(subject, body, **kw),  # type: ignore[arg-type]
                                       label_ids=list(labels), unread=unread, starred=starred)
        if when is not None:
            req.internal_date.CopyFrom(Timestamp(seconds=int(when.timestamp())))
        r = await self.mesh.stub.AppendMessage(req, metadata=self.mesh.md())
        return str(r.message.id)

    async def settle(self, *users: str, timeout: float = 20.0) -> None:
        """Waits until every change of `users`' mailboxes so far is indexed."""
        targets = {}
        for u in users:
            acct = await self.mesh.stub.GetAccount(mpb.GetAccountRequest(name=f"users/{u}"), metadata=self.mesh.md())
            targets[u] = acct.account.highest_modseq
        deadline = time.monotonic() + timeout
        while any(self.indexer.applied.get(u, 0) < m for u, m in targets.items()):
            if time.monotonic() > deadline:
                pytest.fail(f"index did not catch up within {timeout}s: {targets} vs "
                            f"{ {u: self.indexer.applied.get(u, 0) for u in targets} }")
            await asyncio.sleep(0.02)

    async def page(self, user: str, query: str, *, page_size: int = 0, token: str = "",
                   order: int = pb.SEARCH_ORDER_UNSPECIFIED, as_user: bool = True) -> pb.SearchResponse:
        return await self.stub.Search(pb.SearchRequest(parent=f"users/{user}", query=query, page_size=page_size,
                                                       page_token=token, order=order),
                                      metadata=self.md(user if as_user else None))

    async def ids(self, user: str, query: str, *, page_size: int = 100,
                  order: int = pb.SEARCH_ORDER_UNSPECIFIED) -> list[str]:
        """Every result of a query, all pages, in order."""
        out: list[str] = []
        token = ""
        for _ in range(1000):
            r = await self.page(user, query, page_size=page_size, token=token, order=order)
            out.extend(x.message_id for x in r.results)
            token = r.next_page_token
            if not token:
                return out
        raise AssertionError("too many pages")

    async def expect(self, user: str, query: str, expected: Sequence[str]) -> None:
        got = await self.ids(user, query)
        assert sorted(got) == sorted(expected), f"{query!r}: got {got}, expected {list(expected)}"


async def start_search(mesh: Mesh) -> Search:
    settings = dataclasses.replace(mesh.settings, search_port=free_port())
    ctx = await serve("svc_search", settings.search_port, settings, register, service_names=(service_name(),))
    task = asyncio.create_task(run_until_stopped(ctx, signals=False))
    ctx.tasks.append(task)
    channel = grpc.aio.insecure_channel(settings.addr("search"))
    return Search(mesh, ctx, channel, pb_grpc.SearchServiceStub(channel))


async def stop_search(s: Search) -> None:
    await s.channel.close()
    run_task = s.ctx.tasks[-1]
    s.ctx.tasks.remove(run_task)
    s.ctx.server.stop()
    await asyncio.wait_for(run_task, 15)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def searchmesh(shared_mesh: Mesh) -> AsyncIterator[Search]:  # noqa: F811
    s = await start_search(shared_mesh)
    try:
        yield s
    finally:
        await stop_search(s)


async def new_users(s: Search, *names: str) -> dict[str, str]:
    return await fresh_users(s.mesh, *names)
