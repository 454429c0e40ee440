"""The whole mesh a REST client talks to, in this process: svc_mailbox, svc_search and svc_send
over real loopback gRPC with a real nats-server, and svc_gateway serving HTTP (uvicorn) on a free
loopback port. One mesh per test module (module-scoped fixture; test modules declare
`pytestmark = pytest.mark.asyncio(loop_scope="module")`); each test makes its own users in a
fresh domain with `await gateway.new_users("alice", "bob")`.

    async def test_x(gateway: Gateway) -> None:
        u = await gateway.new_users("alice")
        token = await gateway.login(u["alice"].email, PASSWORD)
        async with gateway.client(token) as http:
            r = await http.get("/v1/profile")
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import mailbox_service_pb2 as mpb

from mailmesh_common.config import Settings
from mailmesh_common.grpcserver import PortInUse
from mailmesh_common.service import ServiceContext, run_until_stopped, serve
from svc_gateway.server import register as gateway_register
from svc_gateway.state import GatewayState
from svc_search.server import register as search_register
from svc_search.servicer import service_name as search_service_name
from svc_send.server import register as send_register
from svc_send.servicer import service_name as send_service_name
from tests.svc_mailbox.conftest import Mesh, free_port, module_nats_url, start_mesh, stop_mesh  # noqa: F401

PASSWORD = "correct horse battery"
_domains = itertools.count(1)

# settings of the test mesh: a short undo window so sent mail arrives quickly
MESH_DEFAULTS: dict[str, object] = {"undo_send_s": 2, "smtp_hostname": "mail.gw.test"}


@dataclass(frozen=True)
class User:
    user_id: str
    email: str


@dataclass
class Gateway:
    """The running mesh and its HTTP gateway."""

    mesh: Mesh
    settings: Settings
    base_url: str
    ctxs: list[ServiceContext]

    @property
    def state(self) -> GatewayState:
        """The gateway's shared state (token store, limits...)."""
        return self.ctxs[-1].components["gateway"]  # type: ignore[no-any-return]

    @property
    def state_components(self) -> dict[str, Any]:
        """The gateway service's components (app, http_server, gateway)."""
        return self.ctxs[-1].components

    @property
    def search_ctx(self) -> ServiceContext:
        return self.ctxs[0]

    def client(self, token: str | None = None, **kw: Any) -> httpx.AsyncClient:
        """An httpx client for the gateway, sending `Authorization: Bearer token` when given."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kw.pop("headers", {}))
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30.0, **kw)

    async def new_users(self, *names: str) -> dict[str, User]:
        """New accounts (password PASSWORD) in a fresh domain: {name: User}."""
        domain = f"gw{next(_domains)}.test"
        ids = await self.mesh.admin_setup(domain, names or ("alice", "bob"))
        return {n: User(uid, f"{n}@{domain}") for n, uid in ids.items()}

    async def login(self, email: str, password: str = PASSWORD) -> str:
        """A bearer token from POST /v1/auth/token (fails the test on any other answer)."""
        async with self.client() as http:
            r = await http.post("/v1/auth/token", json={"email": email, "password": password})
        assert r.status_code == 200, r.text
        return str(r.json()["accessToken"])

    async def user_token(self, *names: str) -> dict[str, tuple[User, str]]:
        """New users, each logged in: {name: (User, token)}."""
        users = await self.new_users(*names)
        return {n: (u, await self.login(u.email)) for n, u in users.items()}

    async def append(self, user: str, raw: bytes, *, labels: Sequence[str] = ("INBOX",), unread: bool = True,
                     starred: bool = False, internal_date: int | None = None) -> str:
        """Adds a message to a mailbox directly through MailboxService (as the admin); returns its id."""
        req = mpb.AppendMessageRequest(parent=f"users/{user}", raw=raw, label_ids=list(labels), unread=unread,
                                       starred=starred)
        if internal_date is not None:
            req.internal_date.CopyFrom(Timestamp(seconds=internal_date))
        r = await self.mesh.stub.AppendMessage(req, metadata=self.mesh.md())
        return str(r.message.id)

    async def settle_search(self, *users: str, timeout: float = 30.0) -> None:
        """Waits until every change of the users' mailboxes so far is indexed by svc_search."""
        indexer = self.search_ctx.components["indexer"]
        targets = {}
        for u in users:
            acct = await self.mesh.stub.GetAccount(mpb.GetAccountRequest(name=f"users/{u}"), metadata=self.mesh.md())
            targets[u] = acct.account.highest_modseq
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(indexer.applied.get(u, 0) < m for u, m in targets.items()):
            if loop.time() > deadline:
                pytest.fail(f"search index did not catch up within {timeout}s")
            await asyncio.sleep(0.02)


def raw_message(subject: str = "Hello", body: str = "Hi there.", *, frm: str = "Carol <carol@remote.test>",
                to: str = "someone@gw.test", attachments: Sequence[tuple[str, str, bytes]] = (),
                message_id: str | None = None) -> bytes:
    """An RFC 5322 message; attachments as (filename, mime type, bytes)."""
    from email.message import EmailMessage

    m = EmailMessage()
    m["From"] = frm
    m["To"] = to
    m["Subject"] = subject
    if message_id:
        m["Message-ID"] = f"<{message_id}>"
    m.set_content(body)
    for name, mime, data in attachments:
        maintype, _, subtype = mime.partition("/")
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return bytes(m)


async def _start(name: str, port: int, settings: Settings, register: Any,
                 service_names: tuple[str, ...] = ()) -> ServiceContext:
    ctx = await serve(name, port, settings, register, service_names=service_names)
    ctx.tasks.append(asyncio.create_task(run_until_stopped(ctx, signals=False)))
    return ctx


async def _stop(ctx: ServiceContext) -> None:
    run_task = ctx.tasks[-1]
    ctx.tasks.remove(run_task)
    ctx.server.stop()
    await asyncio.wait_for(run_task, 20)


async def start_gateway(tmp: Any, nats_url: str, **overrides: object) -> Gateway:
    """Starts mailbox, search, send and the gateway; `overrides` are settings (e.g. rate limits).
    A free port taken by someone else before we bound it (the machine's other connections use the
    same ephemeral range) is retried with new ports."""
    for attempt in range(3):
        try:
            return await _start_gateway(tmp, nats_url, **overrides)
        except PortInUse:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _start_gateway(tmp: Any, nats_url: str, **overrides: object) -> Gateway:
    values = {**MESH_DEFAULTS, **overrides}
    mesh = await start_mesh(tmp, nats_url, search_port=free_port(), send_port=free_port(),
                            submission_port=free_port(), gateway_port=free_port(), http_port=free_port(),
                            **values)
    settings = mesh.settings
    ctxs: list[ServiceContext] = []
    try:
        ctxs.append(await _start("svc_search", settings.search_port, settings, search_register,
                                 (search_service_name(),)))
        ctxs.append(await _start("svc_send", settings.send_port, settings, send_register, (send_service_name(),)))
        ctxs.append(await _start("svc_gateway", settings.gateway_port, settings, gateway_register))
    except BaseException:
        for ctx in reversed(ctxs):
            await _stop(ctx)
        await stop_mesh(mesh)
        raise
    return Gateway(mesh, settings, f"http://{settings.host}:{settings.http_port}", ctxs)


async def stop_gateway(gw: Gateway) -> None:
    for ctx in reversed(gw.ctxs):
        await _stop(ctx)
    await stop_mesh(gw.mesh)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory, module_nats_url: str) -> AsyncIterator[Gateway]:  # noqa: F811
    gw = await start_gateway(tmp_path_factory.mktemp("gw"), module_nats_url)
    try:
        yield gw
    finally:
        await stop_gateway(gw)

