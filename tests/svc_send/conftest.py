"""svc_send in this process (real loopback gRPC and SMTP) next to svc_mailbox, with a real
nats-server, the loopback DNS server, and a "remote" mail server: an aiosmtpd sink on 127.0.0.1
found through the MX records of `remote.test` (the delivery port is the sink's, through the
outbound_smtp_port setting). example.com is local, with alice and bob, and has DKIM keys
(RSA and Ed25519) whose TXT records are published on the DNS server.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import send_service_pb2_grpc as spb_grpc
from mailmesh.v1 import types_pb2

from mailmesh_common import auth, grpcclient
from mailmesh_common.config import Settings, load_settings
from mailmesh_common.service import ServiceContext, run_until_stopped, serve
from svc_send.dkim_keys import DkimKeyFiles, dkim_root
from svc_send.server import Send, register
from svc_send.servicer import service_name
from svc_send.tls import self_signed
from tests.conftest import wait_for as common_wait_for
from tests.dnsserver import DnsServer, dns_server  # noqa: F401 (fixture)
from tests.svc_mailbox.conftest import Mesh, free_port, nats_url, start_mesh, stop_mesh  # noqa: F401

T = TypeVar("T")
REMOTE = "remote.test"
LOCAL = "example.com"
WAIT_S = 30.0


# --- the remote mail server -------------------------------------------------------------------------

@dataclass
class Received:
    """One message the sink accepted."""

    mail_from: str
    rcpts: list[str]
    data: bytes
    tls: bool


@dataclass
class Sink:
    """An aiosmtpd server playing the remote domain's MX, with scripted replies."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, list[str]] = field(default_factory=dict)  # per address, used in order
    data_replies: list[str] = field(default_factory=list)  # per DATA, used in order; then 250
    connections: int = 0
    transactions: int = 0
    abandoned: int = 0  # DATA whose client went away before the reply
    data_delay: float = 0.0  # seconds each DATA takes
    active: int = 0  # DATA in progress now, and at most so far
    max_active: int = 0
    hold: asyncio.Event | None = None  # when set: DATA waits for it (or for the client to go)
    data_started: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    server: asyncio.Server | None = None
    sessions: set[SMTP] = field(default_factory=set)  # open connections (server side)

    def drop_connections(self) -> int:
        """Closes every open connection from the server side (as an MX does with idle clients)."""
        n = 0
        for proto in list(self.sessions):
            if proto.transport is not None and not proto.transport.is_closing():
                proto.transport.close()
                n += 1
        return n

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        replies = self.rcpt_replies.get(address.lower())
        if replies:
            reply = replies.pop(0)
            if not reply.startswith("250"):
                return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._data(server, session, envelope)
        finally:
            self.active -= 1

    async def _data(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.transactions += 1
        self.data_started.set()
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.hold is not None:
            try:
                while not self.hold.is_set():
                    await asyncio.sleep(0.05)
            except asyncio.CancelledError:  # aiosmtpd: the client went away; nothing was accepted
                self.abandoned += 1
                raise
        reply = self.data_replies.pop(0) if self.data_replies else "250 2.0.0 OK queued"
        if reply.startswith("250"):
            content = envelope.original_content
            assert isinstance(content, bytes)
            self.messages.append(Received(envelope.mail_from or "", list(envelope.rcpt_tos), content,
                                          session.ssl is not None))
        return reply


class _SinkSMTP(SMTP):
    def __init__(self, sink: Sink, tls: ssl.SSLContext) -> None:
        super().__init__(sink, hostname=f"mx.{REMOTE}", tls_context=tls, decode_data=False,
                         enable_SMTPUTF8=True, auth_require_tls=False)
        self.sink = sink

    def connection_made(self, transport: Any) -> None:
        if self._tls_protocol is None:  # STARTTLS calls it again for the same connection
            self.sink.connections += 1
        super().connection_made(transport)
        self.sink.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink.sessions.discard(self)
        super().connection_lost(error)


_SINK_CERT: list[tuple[Path, Path]] = []


async def start_sink(tmp: Path) -> Sink:
    if not _SINK_CERT:  # one certificate for every sink of the session
        _SINK_CERT.append(self_signed(tmp / "sink-tls", f"mx.{REMOTE}"))
    cert, key = _SINK_CERT[0]
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    sink = Sink()
    loop = asyncio.get_running_loop()
    sink.server = await loop.create_server(lambda: _SinkSMTP(sink, ctx), "127.0.0.1", 0)
    sink.port = int(sink.server.sockets[0].getsockname()[1])
    return sink


# --- the mesh ---------------------------------------------------------------------------------------

DEFAULTS: dict[str, object] = {
    "undo_send_s": 0, "outbound_retry_schedule_s": "0.2,0.5", "outbound_ack_wait_s": 5,
    "smtp_hostname": "mail.example.com", "outbound_connect_timeout_s": 5, "outbound_command_timeout_s": 10,
}


@dataclass
class SendMesh:
    tmp: Path
    mesh: Mesh
    dns: DnsServer
    sink: Sink
    users: dict[str, str]
    settings: Settings | None = None
    ctx: ServiceContext | None = None
    channel: grpc.aio.Channel | None = None
    stub: spb_grpc.SendServiceStub | None = None

    @property
    def send(self) -> Send:
        assert self.ctx is not None
        return self.ctx.components["send"]  # type: ignore[no-any-return]

    @property
    def mb(self) -> Any:
        return self.mesh.stub

    def md(self, user: str | None = None) -> tuple[tuple[str, str], ...]:
        return self.mesh.md(user)

    async def start(self, **overrides: object) -> None:
        values: dict[str, Any] = {**DEFAULTS, **overrides}
        self.settings = load_settings(
            env={}, data_dir=str(self.mesh.settings.data_dir), nats_url=self.mesh.settings.nats_url,
            mailbox_port=self.mesh.settings.mailbox_port, send_port=free_port(), submission_port=free_port(),
            dns_servers=self.dns.address, outbound_smtp_port=self.sink.port, **values)
        self.ctx = await serve("svc_send", self.settings.send_port, self.settings, register,
                               service_names=(service_name(),))
        self.ctx.tasks.append(asyncio.create_task(run_until_stopped(self.ctx, signals=False)))
        self.channel = grpcclient.channel(self.settings.addr("send"), self.settings)
        self.stub = spb_grpc.SendServiceStub(self.channel)

    async def stop(self) -> None:
        if self.ctx is None:
            return
        assert self.channel is not None
        await self.channel.close()
        run_task = self.ctx.tasks[-1]
        self.ctx.tasks.remove(run_task)
        self.ctx.server.stop()
        await asyncio.wait_for(run_task, 20)
        self.ctx = None

    async def add_user(self, name: str) -> str:
        r = await self.mb.CreateAccount(mpb.CreateAccountRequest(
            email=f"{name}@{LOCAL}", password="correct horse battery", display_name=name.title()), metadata=self.md())
        self.users[name] = r.account.user_id
        return r.account.user_id  # type: ignore[no-any-return]

    async def restart(self, **overrides: object) -> None:
        await self.stop()
        await self.start(**overrides)

    # --- acting as a user ---
    async def send_mail(self, user: str, *, to: tuple[str, ...] = (), cc: tuple[str, ...] = (),
                        bcc: tuple[str, ...] = (), subject: str = "hello", text: str = "hi there",
                        **fields: Any) -> spb.SendResponse:
        assert self.stub is not None
        req = spb.SendRequest(parent="users/me", subject=subject, text_body=text,
                              to=[types_pb2.Address(email=a) for a in to],
                              cc=[types_pb2.Address(email=a) for a in cc],
                              bcc=[types_pb2.Address(email=a) for a in bcc], **fields)
        return await self.stub.Send(req, metadata=auth_md(user), timeout=30)  # type: ignore[no-any-return]

    async def message(self, user: str, msg_id: str,
                      fmt: types_pb2.MessageFormat.ValueType = types_pb2.MESSAGE_FORMAT_METADATA
                      ) -> types_pb2.Message:
        r = await self.mb.GetMessage(mpb.GetMessageRequest(name=f"users/{user}/messages/{msg_id}", format=fmt),
                                     metadata=self.md(user))
        return r.message  # type: ignore[no-any-return]

    async def label(self, user: str, label: str) -> list[types_pb2.Message]:
        r = await self.mb.ListMessages(mpb.ListMessagesRequest(parent="users/me", label_id=label, page_size=100),
                                       metadata=self.md(user))
        return list(r.messages)

    async def states(self, user: str, msg_id: str) -> dict[str, int]:
        m = await self.message(user, msg_id)
        return {r.email: r.state for r in m.recipients}


def auth_md(user: str) -> tuple[tuple[str, str], ...]:
    """Metadata of a call on behalf of `user` (the client channel adds the mesh token)."""
    return ((auth.USER_KEY, user),)


async def wait_for(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = WAIT_S) -> T:
    """tests.conftest.wait_for with this package's default bound."""
    return await common_wait_for(check, what, timeout)


def setup_remote(dns: DnsServer, domain: str = REMOTE, address: str = "127.0.0.1") -> None:
    dns.add(domain, "MX", (10, f"mx.{domain}"))
    dns.add(f"mx.{domain}", "A", address)


async def make_send_mesh(tmp: Path, url: str, dns: DnsServer, **overrides: object) -> SendMesh:
    mesh = await start_mesh(tmp, url)
    users = await mesh.admin_setup(LOCAL, ("alice", "bob"))
    keys = DkimKeyFiles(dkim_root(mesh.settings.data_dir))  # imported into the store at start
    for selector, algorithm in (("rsa1", "rsa"), ("ed1", "ed25519")):
        key = keys.generate(LOCAL, selector, algorithm)
        dns.add(key.record_name, "TXT", key.txt_record())
    setup_remote(dns)
    sink = await start_sink(tmp)
    sm = SendMesh(tmp, mesh, dns, sink, users)
    await sm.start(**overrides)
    return sm


async def close_send_mesh(sm: SendMesh) -> None:
    await sm.stop()
    if sm.sink.server is not None:
        sm.sink.server.close()
    await stop_mesh(sm.mesh)


@pytest.fixture
async def sm(tmp_path: Path, nats_url: str, dns_server: DnsServer,  # noqa: F811
             request: pytest.FixtureRequest) -> AsyncIterator[SendMesh]:
    """The mesh; a test marked `@pytest.mark.send_settings(key=value...)` starts svc_send with them."""
    marker = request.node.get_closest_marker("send_settings")
    overrides = dict(marker.kwargs) if marker else {}
    m = await make_send_mesh(tmp_path, nats_url, dns_server, **overrides)
    try:
        yield m
    finally:
        await close_send_mesh(m)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "send_settings(**kw): svc_send settings for the `sm` fixture")
