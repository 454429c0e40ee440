"""Mailbox benchmark (issue: list p99 < 10 ms): fills one INBOX with N messages through the
real DeliverMessage RPC on a running svc_mailbox (embedded SQLite store, loopback gRPC), then
measures the first page of 50 by plain list and by unread filter, and deliveries per second.

    .venv/bin/python -m tests.bench.bench_mailbox --messages 100000

Prints figures; asserts nothing. Uses the real mail corpus for message bodies when present.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc
from mailmesh.v1 import types_pb2

from mailmesh_common import auth
from mailmesh_common.blobstore import BlobStore
from mailmesh_common.config import Settings, load_settings
from mailmesh_common.natsserver import find_nats_server, write_config
from mailmesh_common.service import run_until_stopped, serve
from svc_mailbox.server import register
from svc_mailbox.servicer import service_name
from tests.bench.common import free_port, pct

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "mail" / "jailhouse-dev"


def _base() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CORPUS.glob("*.eml"))[:500]] if CORPUS.is_dir() else []


def message(i: int, base: list[bytes]) -> bytes:
    """Distinct raw message number i: a corpus message with a unique Message-ID (no thread
    headers), or a synthetic one when the corpus is absent."""
    if base:
        raw = base[i % len(base)]
        head, _, body = raw.partition(b"\n\n")
        copy = i // len(base)  # each pass over the corpus gets its own subjects, so threads stay small
        lines = [ln + f" #{copy}".encode() if ln.lower().startswith(b"subject:") else ln
                 for ln in head.split(b"\n")
                 if not ln.lower().startswith((b"message-id:", b"references:", b"in-reply-to:"))]
        return b"\n".join(lines) + f"\nMessage-ID: <bench-{i}@bench.test>\n\n".encode() + body
    return (f"From: Sender {i % 97} <s{i % 97}@remote.test>\r\nTo: bench@example.com\r\n"
            f"Subject: Benchmark message {i}\r\nMessage-ID: <bench-{i}@bench.test>\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\n" + "Hello world. " * 50 + "\r\n").encode()


def messages(n: int) -> list[bytes]:
    base = _base()
    return [message(i, base) for i in range(n)]


async def fill(stub: pb_grpc.MailboxServiceStub, md: tuple[tuple[str, str], ...], user: str, settings: Settings,
               args: argparse.Namespace) -> tuple[float, list[float], float]:
    """Stores the blobs (ingest's work, not timed), then delivers every message; returns the
    delivery time, each delivery's latency and the CPU seconds this process (the service and
    its gRPC client) spent delivering."""
    blobs = BlobStore(settings.data_dir / "blobs")
    base = _base()
    todo = list(range(args.messages))
    refs: list[str] = [""] * args.messages

    async def store() -> None:
        while todo:
            i = todo.pop()
            refs[i] = await blobs.put(message(i, base))

    await asyncio.gather(*(store() for _ in range(16)))
    queue = list(enumerate(refs))
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            i, ref = queue.pop()
            t0 = time.perf_counter()
            await stub.DeliverMessage(pb.DeliverMessageRequest(
                parent=f"users/{user}", ingest_id=f"bench-{i}", blob_ref=ref,
                target=pb.DELIVERY_TARGET_INBOX), metadata=md, timeout=30)
            latencies.append(time.perf_counter() - t0)

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return time.perf_counter() - t0, latencies, time.process_time() - cpu0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    ap.add_argument("--data-dir", help="reuse (or create and keep) this directory: a mailbox filled by an "
                                       "earlier run is measured again without refilling it")
    args = ap.parse_args()

    tmp = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="mailmesh-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    refill = not (tmp / "filled").exists()
    if args.data_dir:
        args.keep = True
    nats_port = free_port()
    conf = write_config(tmp / "nats", "127.0.0.1", nats_port)
    nats = subprocess.Popen([str(find_nats_server()), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        await asyncio.sleep(0.5)
        settings = load_settings(env={}, data_dir=str(tmp / "data"), nats_url=f"nats://127.0.0.1:{nats_port}",
                                 mailbox_port=free_port(), log_level="WARNING")
        ctx = await serve("svc_mailbox", settings.mailbox_port, settings, register, service_names=(service_name(),))
        runner = asyncio.create_task(run_until_stopped(ctx, signals=False))
        md = ((auth.TOKEN_KEY, settings.token()),)
        async with grpc.aio.insecure_channel(settings.addr("mailbox")) as ch:
            stub = pb_grpc.MailboxServiceStub(ch)
            elapsed = cpu = 0.0
            latencies: list[float] = []
            if refill:
                await stub.CreateDomain(pb.CreateDomainRequest(name="example.com"), metadata=md)
                await stub.CreateAccount(pb.CreateAccountRequest(
                    email="bench@example.com", password="benchmark-password", quota_bytes=1 << 50), metadata=md)
            user = (await stub.GetAccount(pb.GetAccountRequest(email="bench@example.com"), metadata=md)).account.user_id
            if refill:
                elapsed, latencies, cpu = await fill(stub, md, user, settings, args)
                (tmp / "filled").write_text(str(args.messages))
            else:
                args.messages = int((tmp / "filled").read_text())
            # mark every other message of the newest 2,000 read, so the unread filter has work to skip
            page = await stub.ListMessages(pb.ListMessagesRequest(parent=f"users/{user}", label_id="INBOX",
                                                                  page_size=500, format=types_pb2.MESSAGE_FORMAT_MINIMAL),
                                           metadata=md)
            ids = [m.id for m in page.messages][::2]
            await stub.BatchModifyMessages(pb.BatchModifyMessagesRequest(parent=f"users/{user}", ids=ids,
                                                                         unread=False), metadata=md)
            umd = md + ((auth.USER_KEY, user),)
            results = {}
            for name, req in (("list", pb.ListMessagesRequest(parent="users/me", label_id="INBOX", page_size=50)),
                              ("unread", pb.ListMessagesRequest(parent="users/me", label_id="INBOX", page_size=50,
                                                                unread_only=True)),
                              ("threads", pb.ListThreadsRequest(parent="users/me", label_id="INBOX", page_size=50))):
                call = stub.ListThreads if name == "threads" else stub.ListMessages
                samples = []
                for _ in range(args.samples):
                    t = time.perf_counter()
                    r = await call(req, metadata=umd)
                    samples.append((time.perf_counter() - t) * 1000)
                assert len(r.messages if name != "threads" else r.threads) == 50  # type: ignore[union-attr]
                results[name] = {"p50_ms": round(statistics.median(samples), 2), "p99_ms": round(pct(samples, 99), 2)}
        ctx.server.stop()
        await runner
        print(json.dumps({
            "messages": args.messages,
            "deliveries_per_s": round(args.messages / elapsed, 1) if elapsed else "not measured (reused store)",
            "delivery_latency_ms": {"p50": round(statistics.median(latencies) * 1000, 2),
                                    "p99": round(pct(latencies, 99) * 1000, 2)} if latencies else {},
            # steadier than the rate on a shared machine; includes the benchmark's gRPC client
            "cpu_ms_per_delivery": round(cpu * 1000 / args.messages, 2) if latencies else None,
            "first_page_of_50": results,
            "store_bytes": (settings.data_dir / "mailbox.db").stat().st_size,
        }, indent=2))
    finally:
        nats.terminate()
        nats.wait(10)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"data kept in {tmp}")


if __name__ == "__main__":
    asyncio.run(main())
