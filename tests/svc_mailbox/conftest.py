"""A running svc_mailbox (in this process, over real loopback gRPC) with its own real
nats-server and data dir, and helpers to act as the admin or as a user."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import pytest
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from mailmesh_common import auth
from mailmesh_common.config import Settings, load_settings
from mailmesh_common.natsserver import find_nats_server, write_config
from mailmesh_common.service import ServiceContext, run_until_stopped, serve
from svc_mailbox.server import register
from svc_mailbox.servicer import service_name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    conf = write_config(tmp_path / "nats", "127.0.0.1", port)
    proc = subprocess.Popen([str(find_nats_server()), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@dataclass
class Mesh:
    settings: Settings
    ctx: ServiceContext
    channel: grpc.aio.Channel
    stub: pb_grpc.MailboxServiceStub
    nc: NATS
    js: JetStreamContext

    def md(self, user: str | None = None, token: str | None = None) -> tuple[tuple[str, str], ...]:
        out = ((auth.TOKEN_KEY, self.settings.token() if token is None else token),)
        return out + (((auth.USER_KEY, user),) if user else ())

    async def admin_setup(self, domain: str = "example.com",
                          users: tuple[str, ...] = ("alice", "bob")) -> dict[str, str]:
        await self.stub.CreateDomain(pb.CreateDomainRequest(name=domain), metadata=self.md())
        ids = {}
        for name in users:
            r = await self.stub.CreateAccount(pb.CreateAccountRequest(
                email=f"{name}@{domain}", password="correct horse battery", display_name=name.title()),
                metadata=self.md())
            ids[name] = r.account.user_id
        return ids


async def start_mesh(tmp_path: Path, nats_url: str, **overrides: object) -> Mesh:
    settings = load_settings(env={}, data_dir=str(tmp_path / "data"), nats_url=nats_url,
                             mailbox_port=free_port(), **overrides)
    ctx = await serve("svc_mailbox", settings.mailbox_port, settings, register,
                      service_names=(service_name(),))
    task = asyncio.create_task(run_until_stopped(ctx, signals=False))
    ctx.tasks.append(task)  # keeps a reference; stop_mesh awaits it
    channel = grpc.aio.insecure_channel(settings.addr("mailbox"))
    nc = await nats.connect(nats_url)
    return Mesh(settings, ctx, channel, pb_grpc.MailboxServiceStub(channel), nc, nc.jetstream())


async def stop_mesh(mesh: Mesh) -> None:
    await mesh.channel.close()
    await mesh.nc.close()
    run_task = mesh.ctx.tasks[-1]
    mesh.ctx.tasks.remove(run_task)
    mesh.ctx.server.stop()
    await asyncio.wait_for(run_task, 15)


@pytest.fixture
async def mesh(tmp_path: Path, nats_url: str) -> AsyncIterator[Mesh]:
    m = await start_mesh(tmp_path, nats_url)
    try:
        yield m
    finally:
        await stop_mesh(m)


@pytest.fixture
async def users(mesh: Mesh) -> dict[str, str]:
    return await mesh.admin_setup()


# --- a mesh shared by the tests of one module (each test makes its own domain and users) ----------

import pytest_asyncio  # noqa: E402

_module_domains = iter(range(1, 1_000_000))


@pytest.fixture(scope="module")
def module_nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    conf = write_config(tmp_path_factory.mktemp("nats"), "127.0.0.1", port)
    proc = subprocess.Popen([str(find_nats_server()), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_mesh(tmp_path_factory: pytest.TempPathFactory, module_nats_url: str) -> AsyncIterator[Mesh]:
    m = await start_mesh(tmp_path_factory.mktemp("mesh"), module_nats_url)
    try:
        yield m
    finally:
        await stop_mesh(m)


async def fresh_users(mesh: Mesh, *names: str) -> dict[str, str]:
    """A new domain with new accounts in a shared mesh: {name: user_id}."""
    return await mesh.admin_setup(f"d{next(_module_domains)}.test", names or ("alice", "bob"))
