"""A running svc_ingest (in this process: real SMTP and gRPC over loopback) in front of a running
svc_mailbox (also in this process), with a real nats-server that tests may kill and restart,
a real DNS server (tests/dnsserver.py), and, for virus tests, a real clamd with the shipped
test signature database.

SMTP clients are the standard library's smtplib, run in worker threads (`await in_thread(...)`)
so the services keep serving on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import pytest_asyncio
from mailmesh.v1 import ingest_service_pb2_grpc as ingest_grpc
from mailmesh.v1 import mailbox_service_pb2 as mb_pb
from mailmesh.v1 import mailbox_service_pb2_grpc as mb_grpc
from mailmesh.v1 import types_pb2
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mailmesh_common import auth, telemetry
from mailmesh_common.config import Settings, load_settings
from mailmesh_common.natsserver import NatsServer
from mailmesh_common.service import ServiceContext, run_until_stopped, serve
from svc_ingest.server import Ingest, start_ingest
from svc_ingest.servicer import service_name
from svc_mailbox.server import register as mailbox_register
from svc_mailbox.servicer import service_name as mailbox_service_name
from tests.dnsserver import DnsServer, dns_server, module_dns_server  # noqa: F401  (fixtures)
from tests.svc_mailbox.conftest import Mesh, start_mesh

DATA = Path(__file__).resolve().parent / "data"
DOMAIN = "example.com"
USERS = ("alice", "bob", "carol")

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Runs a blocking SMTP client call without stopping the services on this loop."""
    return await asyncio.to_thread(fn, *args)


# --- EICAR ---------------------------------------------------------------------------------------

def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test file, put together here so no file of the repository
    contains it (scanners would flag the checkout)."""
    return ("X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "EICAR-STANDARD-" + "ANTIVIRUS-TEST-FILE!$H+H*").encode()


# --- spans ----------------------------------------------------------------------------------------

@pytest.fixture
def span_exporter() -> Iterator[InMemorySpanExporter]:
    """Finished spans of this process. Adds a processor to the process's tracer provider,
    installing it first if needed."""
    provider = telemetry.setup_telemetry("tests")
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    try:
        yield exporter
    finally:
        exporter.shutdown()  # the processor stays registered but exports nothing more


# --- nats-server that a test can kill and start again ---------------------------------------------

class Nats:
    """A real nats-server (JetStream, fsync always) on a fixed port and store under tmp."""

    def __init__(self, root: Path) -> None:
        self.server = NatsServer(root / "nats", "127.0.0.1", free_port())

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> None:
        self.server.start_and_wait(timeout_s=20)

    def kill(self) -> None:
        """SIGKILL, like a crash."""
        proc = self.server.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        self.server.stop(timeout_s=5)


# --- clamd ----------------------------------------------------------------------------------------

CLAMD_CANDIDATES = ("/usr/sbin/clamd", "/usr/bin/clamd")


def find_clamd() -> str | None:
    for path in CLAMD_CANDIDATES:
        if Path(path).is_file():
            return path
    return shutil.which("clamd")


class Clamd:
    """clamd (Debian's clamav-daemon binary) with a temp config: a unix socket in tmp and only
    the test signature database shipped in tests/svc_ingest/data. Never runs freshclam."""

    def __init__(self, binary: str, root: Path) -> None:
        self.root = root
        self.socket = root / "clamd.sock"
        db = root / "db"
        db.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / "eicar.ndb", db / "eicar.ndb")
        self.conf = root / "clamd.conf"
        self.conf.write_text("\n".join([
            f"LocalSocket {self.socket}", f"DatabaseDirectory {db}", "Foreground yes",
            f"LogFile {root / 'clamd.log'}", f"PidFile {root / 'clamd.pid'}", f"TemporaryDirectory {root}",
            "Bytecode no", "StreamMaxLength 64M", "LocalSocketMode 600", ""]))
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"clamd exited with {self.proc.returncode}: {err[-2000:]}")
            if self._pong():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("clamd did not answer PING within 60 s")

    def _pong(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(self.socket))
                s.sendall(b"zPING\0")
                return s.recv(16).startswith(b"PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="session")
def clamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    binary = find_clamd()
    if binary is None:
        pytest.skip("clamd is not installed (Debian package clamav-daemon); virus scanning tests need a real clamd")
    c = Clamd(binary, tmp_path_factory.mktemp("clamd"))
    try:
        yield c
    finally:
        c.stop()


# --- the mesh: nats + svc_mailbox + svc_ingest ----------------------------------------------------

@dataclass
class IngestMesh:
    nats: Nats
    dns: DnsServer
    mailbox: Mesh
    ctx: ServiceContext
    ingest: Ingest
    settings: Settings
    channel: grpc.aio.Channel
    stub: ingest_grpc.IngestServiceStub
    run_task: asyncio.Task[None]
    mailbox_run_task: asyncio.Task[None]
    users: dict[str, str] = field(default_factory=dict)
    domain: str = DOMAIN

    @property
    def smtp_port(self) -> int:
        return self.ingest.smtp_port

    def md(self) -> tuple[tuple[str, str], ...]:
        return ((auth.TOKEN_KEY, self.settings.token()),)

    def smtp(self, timeout: float = 30) -> smtplib.SMTP:
        """A connected smtplib client (blocking: use it inside in_thread)."""
        return smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="client.remote.test", timeout=timeout)

    def addr(self, name: str) -> str:
        return f"{name}@{self.domain}"

    async def messages(self, user: str, label: str = "INBOX",
                       fmt: types_pb2.MessageFormat.ValueType = types_pb2.MESSAGE_FORMAT_METADATA) -> list[types_pb2.Message]:
        resp = await self.mailbox.stub.ListMessages(mb_pb.ListMessagesRequest(
            parent=f"users/{self.users[user]}", label_id=label, page_size=500, format=fmt),
            metadata=self.mailbox.md())
        return list(resp.messages)

    async def raw(self, user: str, message_id: str) -> bytes:
        resp = await self.mailbox.stub.GetMessage(mb_pb.GetMessageRequest(
            name=f"users/{self.users[user]}/messages/{message_id}", format=types_pb2.MESSAGE_FORMAT_RAW),
            metadata=self.mailbox.md())
        return bytes(resp.message.raw)

    async def wait_for(self, user: str, predicate: Callable[[list[types_pb2.Message]], bool],
                       label: str = "INBOX", timeout: float = 15) -> list[types_pb2.Message]:
        deadline = time.monotonic() + timeout
        while True:
            msgs = await self.messages(user, label)
            if predicate(msgs):
                return msgs
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting in {user}'s {label}; it has "
                                     f"{[m.subject for m in msgs]}")
            await asyncio.sleep(0.05)

    async def wait_subject(self, user: str, subject: str, label: str = "INBOX",
                           timeout: float = 15) -> types_pb2.Message:
        msgs = await self.wait_for(user, lambda ms: any(m.subject == subject for m in ms), label, timeout)
        return next(m for m in msgs if m.subject == subject)


def ingest_settings(data_dir: Path, nats_url: str, mailbox_addr: str, dns: DnsServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        data_dir=str(data_dir), nats_url=nats_url, mailbox_addr=mailbox_addr,
        ingest_port=free_port(), smtp_port=free_port(), dns_servers=dns.address, smtp_hostname="mx.mailmesh.test",
        per_ip_max_connections=50, per_ip_messages_per_minute=10_000)
    values.update(overrides)
    return load_settings(env={}, **values)


async def start_ingest_mesh(root: Path, nats: Nats, dns: DnsServer, *, users: tuple[str, ...] = USERS,
                            mailbox_overrides: dict[str, Any] | None = None, **overrides: Any) -> IngestMesh:
    """svc_mailbox (its settings plus mailbox_overrides) and svc_ingest (overrides; the settings
    both read, such as postmaster, go to both)."""
    shared = {k: overrides[k] for k in ("postmaster",) if k in overrides}
    mailbox = await start_mesh(root, nats.url, **shared, **(mailbox_overrides or {}))
    # keep svc_mailbox's run task out of its ctx.tasks: a service that stops by itself (a dead
    # background task) must not end up awaiting itself
    mailbox_run = mailbox.ctx.tasks.pop()
    ids = await mailbox.admin_setup(DOMAIN, users)
    mailbox_addr = str(overrides.pop("mailbox_addr", mailbox.settings.addr("mailbox")))
    settings = ingest_settings(mailbox.settings.data_dir, nats.url, mailbox_addr, dns, **overrides)
    holder: list[Ingest] = []

    async def register(ctx: ServiceContext) -> None:
        holder.append(await start_ingest(ctx))

    ctx = await serve("svc_ingest", settings.ingest_port, settings, register, service_names=(service_name(),))
    run = asyncio.create_task(run_until_stopped(ctx, signals=False))
    channel = grpc.aio.insecure_channel(settings.addr("ingest"))
    return IngestMesh(nats, dns, mailbox, ctx, holder[0], settings, channel,
                      ingest_grpc.IngestServiceStub(channel), run, mailbox_run, ids)


async def restart_mailbox(m: IngestMesh) -> None:
    """Starts svc_mailbox again on the same settings (data dir, port) after it stopped."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(m.mailbox_run_task, 20)
    await m.mailbox.channel.close()
    s = m.mailbox.settings
    ctx = await serve("svc_mailbox", s.mailbox_port, s, mailbox_register, service_names=(mailbox_service_name(),))
    m.mailbox.ctx = ctx
    m.mailbox_run_task = asyncio.create_task(run_until_stopped(ctx, signals=False))
    m.mailbox.channel = grpc.aio.insecure_channel(s.addr("mailbox"))
    m.mailbox.stub = mb_grpc.MailboxServiceStub(m.mailbox.channel)


async def stop_ingest_mesh(m: IngestMesh) -> None:
    await m.channel.close()
    m.ctx.server.stop()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(m.run_task, 20)
    await m.mailbox.channel.close()
    await m.mailbox.nc.close()
    m.mailbox.ctx.server.stop()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(m.mailbox_run_task, 20)


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[Nats]:
    n = Nats(tmp_path)
    n.start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture(scope="module")
def module_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nats]:
    n = Nats(tmp_path_factory.mktemp("nats"))
    n.start()
    try:
        yield n
    finally:
        n.stop()


@pytest.fixture
async def ingest_mesh(tmp_path: Path, nats: Nats, dns_server: DnsServer) -> AsyncIterator[IngestMesh]:  # noqa: F811
    m = await start_ingest_mesh(tmp_path, nats, dns_server)
    try:
        yield m
    finally:
        await stop_ingest_mesh(m)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_ingest(tmp_path_factory: pytest.TempPathFactory, module_nats: Nats,
                        module_dns_server: DnsServer) -> AsyncIterator[IngestMesh]:  # noqa: F811
    m = await start_ingest_mesh(tmp_path_factory.mktemp("ingest"), module_nats, module_dns_server)
    try:
        yield m
    finally:
        await stop_ingest_mesh(m)


def reply_of(exc: smtplib.SMTPResponseException) -> tuple[int, bytes]:
    """(code, text) of a refused command, as smtplib returns them for accepted ones."""
    text = exc.smtp_error
    return exc.smtp_code, text if isinstance(text, bytes) else str(text).encode()


def message(subject: str, *, to: str = "alice@example.com", sender: str = "sender@remote.test",
            body: str = "Hello there.\r\n", headers: tuple[str, ...] = ()) -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    lines = [f"From: Sender <{sender}>", f"To: {to}", f"Subject: {subject}",
             f"Message-ID: <{subject.replace(' ', '-')}-{time.monotonic_ns()}@remote.test>",
             "Date: Mon, 23 Nov 2026 10:00:00 +0000", *headers, "", body]
    return "\r\n".join(lines).encode()
