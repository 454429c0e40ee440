"""REST gateway benchmark (issue 7: list p99 < 20 ms through HTTP): requests/s and p50/p99
latency of list (first page of 50 of a large INBOX), get-message (format=full) and modify
(toggle starred), through real HTTP on loopback.

    .venv/bin/python -m tests.bench.bench_gateway --messages 100000 --data-dir /tmp/gw-bench

Seeding (once per data dir): svc_mailbox runs in this process and the messages are stored
through its in-process API (Mailbox.append, no RPC per message). Measuring: svc_mailbox and
svc_gateway run as their own processes (`python -m svc_x`, as deployed) and a bounded load
client here (`--concurrency` requests in flight, `--requests` per scenario after `--warmup`)
talks HTTP/1.1 keep-alive to the gateway. Prints JSON figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc

from mailmesh_common import auth
from mailmesh_common.config import Settings, load_settings, settings_env
from mailmesh_common.natsserver import find_nats_server, write_config
from mailmesh_common.service import run_until_stopped, serve
from svc_mailbox.server import register
from svc_mailbox.servicer import service_name
from tests.bench.bench_mailbox import _base, message
from tests.bench.common import free_port, pct

EMAIL = "bench@example.com"
PASSWORD = "benchmark-password"


async def seed(settings: Settings, n: int, concurrency: int) -> float:
    """Creates the account and stores n messages in its INBOX; returns messages per second."""
    ctx = await serve("svc_mailbox", settings.mailbox_port, settings, register, service_names=(service_name(),))
    runner = asyncio.create_task(run_until_stopped(ctx, signals=False))
    mailbox = ctx.components["mailbox"]
    md = ((auth.TOKEN_KEY, settings.token()),)
    async with grpc.aio.insecure_channel(settings.addr("mailbox")) as ch:
        stub = pb_grpc.MailboxServiceStub(ch)
        try:
            await stub.CreateDomain(pb.CreateDomainRequest(name="example.com"), metadata=md)
        except grpc.aio.AioRpcError:
            pass
        acct = await stub.CreateAccount(pb.CreateAccountRequest(email=EMAIL, password=PASSWORD, quota_bytes=1 << 50),
                                        metadata=md)
    user = acct.account.user_id
    base = _base()
    todo = list(range(n))
    start = int(time.time()) - n

    async def worker() -> None:
        while todo:
            i = todo.pop()
            req = pb.AppendMessageRequest(parent=f"users/{user}", raw=message(i, base), label_ids=["INBOX"],
                                          unread=i % 3 == 0)
            req.internal_date.CopyFrom(Timestamp(seconds=start + i))
            await mailbox.append(user, req)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    ctx.server.stop()
    await runner
    return n / elapsed if elapsed else 0.0


def start(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    return subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out, stderr=out)


async def wait_http(base: str, procs: list[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise SystemExit("a service exited during start; see the logs in the data dir")
            try:
                if (await http.get("/openapi.json")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the gateway did not come up")


async def run_scenario(http: httpx.AsyncClient, make: Any, requests: int, warmup: int,
                       concurrency: int) -> dict[str, Any]:
    """`requests` calls of `make(i)` (a coroutine returning a response) with at most
    `concurrency` in flight; latency of each, and the throughput over the whole run."""
    for i in range(warmup):
        r = await make(i)
        r.raise_for_status()
    latencies: list[float] = []
    counter = iter(range(requests))
    errors = 0

    async def worker() -> None:
        nonlocal errors
        for i in counter:
            t = time.perf_counter()
            r = await make(i)
            latencies.append((time.perf_counter() - t) * 1000)
            if r.status_code >= 300:
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {"requests": requests, "errors": errors, "requests_per_s": round(requests / elapsed, 1),
            "p50_ms": round(statistics.median(latencies), 2), "p99_ms": round(pct(latencies, 99), 2)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per scenario")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=2, help="requests in flight (bounded load client)")
    ap.add_argument("--seed-concurrency", type=int, default=32)
    ap.add_argument("--data-dir", help="reuse (or create and keep) this directory: a mailbox seeded by an "
                                       "earlier run is measured again without seeding")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    args = ap.parse_args()

    tmp = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="mailmesh-gw-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    keep = args.keep or bool(args.data_dir)
    nats_port = free_port()
    conf = write_config(tmp / "nats", "127.0.0.1", nats_port)
    nats = subprocess.Popen([str(find_nats_server()), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        await asyncio.sleep(0.5)
        settings = load_settings(env={}, data_dir=str(tmp / "data"), nats_url=f"nats://127.0.0.1:{nats_port}",
                                 mailbox_port=free_port(), gateway_port=free_port(), http_port=free_port(),
                                 search_port=free_port(), send_port=free_port(), log_level="WARNING",
                                 gateway_requests_per_minute=0, gateway_searches_per_minute=0)
        seeded = tmp / "seeded"
        seed_rate: float | str = "not measured (reused data dir)"
        if not seeded.exists():
            seed_rate = round(await seed(settings, args.messages, args.seed_concurrency), 1)
            seeded.write_text(str(args.messages))
        n = int(seeded.read_text())

        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILMESH_")}
        env.update(settings_env(settings))
        procs.append(start("svc_mailbox", env, tmp / "svc_mailbox.log"))
        procs.append(start("svc_gateway", env, tmp / "svc_gateway.log"))
        base = f"http://127.0.0.1:{settings.http_port}"
        await wait_http(base, procs)

        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
            r = await http.post("/v1/auth/token", json={"email": EMAIL, "password": PASSWORD})
            r.raise_for_status()
            http.headers["Authorization"] = f"Bearer {r.json()['accessToken']}"
            page = (await http.get("/v1/messages", params={"labelIds": "INBOX", "maxResults": 500})).json()
            ids = [m["id"] for m in page["messages"]]
            rnd = random.Random(7)

            def list_page(i: int) -> Any:
                return http.get("/v1/messages", params={"labelIds": "INBOX", "maxResults": 50})

            def get_message(i: int) -> Any:
                return http.get(f"/v1/messages/{rnd.choice(ids)}", params={"format": "full"})

            def modify(i: int) -> Any:
                return http.post(f"/v1/messages/{rnd.choice(ids)}/modify", json={"starred": i % 2 == 0})

            results = {}
            for name, make in (("list", list_page), ("get_message", get_message), ("modify", modify)):
                results[name] = await run_scenario(http, make, args.requests, args.warmup, args.concurrency)
        print(json.dumps({"messages": n, "seeded_messages_per_s": seed_rate, "concurrency": args.concurrency,
                          "results": results}, indent=2))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        nats.terminate()
        nats.wait(10)
        if keep:
            print(f"data kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
