"""Several svc_ingest workers share the SMTP and gRPC ports (ingest_workers > 1, SO_REUSEPORT):
the kernel spreads connections over them and every message is delivered exactly once; with a
single worker the SMTP port stays exclusive, so a second installation cannot bind it unnoticed."""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
from pathlib import Path

import pytest

from mailmesh_common.grpcserver import PortInUse
from mailmesh_common.service import ServiceContext, run_until_stopped, serve
from svc_ingest.server import Ingest, start_ingest
from svc_ingest.servicer import service_name
from tests.dnsserver import DnsServer
from tests.svc_ingest.conftest import (
    IngestMesh,
    Nats,
    in_thread,
    message,
    start_ingest_mesh,
    stop_ingest_mesh,
)

CONNECTIONS = 24


async def second_worker(m: IngestMesh) -> tuple[ServiceContext, Ingest, asyncio.Task[None]]:
    holder: list[Ingest] = []

    async def register(ctx: ServiceContext) -> None:
        holder.append(await start_ingest(ctx))

    ctx = await serve("svc_ingest", m.settings.ingest_port, m.settings, register, service_names=(service_name(),))
    return ctx, holder[0], asyncio.create_task(run_until_stopped(ctx, signals=False))


def send_one(m: IngestMesh, i: int) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", m.smtp_port, local_hostname="client.remote.test", timeout=60) as s:
        return s.sendmail("sender@remote.test", ["alice@example.com"], message(f"worker mail {i}"))


async def test_two_workers_share_the_smtp_port(tmp_path: Path, nats: Nats, dns_server: DnsServer) -> None:
    m = await start_ingest_mesh(tmp_path, nats, dns_server, ingest_workers=2)
    ctx2 = None
    try:
        ctx2, ingest2, run2 = await second_worker(m)
        assert ingest2.smtp_port == m.smtp_port
        results = await asyncio.gather(*(in_thread(send_one, m, i) for i in range(CONNECTIONS)))
        assert all(r == {} for r in results)
        subjects = {f"worker mail {i}" for i in range(CONNECTIONS)}
        got = await m.wait_for("alice", lambda ms: subjects <= {x.subject for x in ms}, timeout=60)
        assert sorted(x.subject for x in got if x.subject in subjects) == sorted(subjects), "each exactly once"
        served = (m.ingest.listener.connections_total, ingest2.listener.connections_total)
        assert sum(served) == CONNECTIONS and min(served) > 0, f"connections per worker: {served}"
    finally:
        if ctx2 is not None:
            ctx2.server.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(run2, 20)
        await stop_ingest_mesh(m)


async def test_a_single_worker_keeps_the_smtp_port_to_itself(ingest_mesh: IngestMesh) -> None:
    assert ingest_mesh.settings.ingest_workers in (0, 1)  # a standalone process: one worker
    with pytest.raises(PortInUse):
        await second_worker(ingest_mesh)
