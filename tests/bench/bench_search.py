"""Search benchmark (issue: lag p99 < 1 s, query p99 < 50 ms on 2 cores).

Runs nats-server, svc_mailbox and svc_search as separate processes (as `mailmesh up` does) on a
temporary data dir, and measures through the real paths:

1. fill: N realistic messages (the jailhouse-dev corpus, each with its own Message-ID and a
   received date spread over ~3 years) delivered to one user with DeliverMessage, while
   svc_search is stopped;
2. indexing rate: svc_search starts and indexes the backlog from EVENTS (mailbox → relay →
   NATS → indexer → GetMessage FULL → tantivy); documents per second until every one is in;
3. query latency: Search RPCs (page of 50, newest first) for a mix of word, phrase, from:,
   date-range and has:attachment queries, p50/p99 per kind and overall;
4. index lag: probe messages with a unique word are delivered (at --probe-rate per second,
   alongside --load background deliveries per second); lag is the time from DeliverMessage's
   acknowledgement until a Search finds the probe (one query for all outstanding probes every
   5 ms, so that polling does not swamp the service).

    .venv/bin/python -m tests.bench.bench_search                  # 100,000 messages
    .venv/bin/python -m tests.bench.bench_search --messages 5000  # a quicker run

Prints figures as JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import mailbox_service_pb2_grpc as mpb_grpc
from mailmesh.v1 import search_service_pb2 as pb
from mailmesh.v1 import search_service_pb2_grpc as pb_grpc

from mailmesh_common import auth
from mailmesh_common.blobstore import BlobStore
from mailmesh_common.config import load_settings, settings_env
from mailmesh_common.mime import parse_message
from mailmesh_common.natsserver import find_nats_server, write_config
from tests.bench.common import free_port, pct

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus" / "mail" / "jailhouse-dev"
REPO = Path(__file__).resolve().parents[2]
SPAN_S = 3 * 365 * 86_400  # received dates spread over three years
END = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
WORD = re.compile(r"[A-Za-z]{4,12}")


def summary(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2), "p99_ms": round(pct(ms, 99), 2),
            "max_ms": round(max(ms), 2)}


def corpus() -> list[bytes]:
    if not CORPUS.is_dir():
        raise SystemExit(f"corpus not found at {CORPUS}")
    return [p.read_bytes() for p in sorted(CORPUS.glob("*.eml"))]


def message(i: int, base: list[bytes], extra_subject: str = "") -> bytes:
    """Corpus message i % len(base) with a unique Message-ID and no thread headers."""
    raw = base[i % len(base)]
    sep = b"\r\n\r\n" if b"\r\n\r\n" in raw[:20000] else b"\n\n"
    head, _, body = raw.partition(sep)
    nl = b"\r\n" if sep == b"\r\n\r\n" else b"\n"
    lines = [ln for ln in re.split(rb"\r?\n(?![ \t])", head)
             if not ln.lower().startswith((b"message-id:", b"references:", b"in-reply-to:"))]
    if extra_subject:
        lines = [b"Subject: " + extra_subject.encode() if ln.lower().startswith(b"subject:") else ln
                 for ln in lines]
    return nl.join(lines) + nl + f"Message-ID: <bench-{i}@bench.test>".encode() + sep + body


def query_mix(base: list[bytes], rnd: random.Random, n: int) -> list[tuple[str, str]]:
    """(kind, query) pairs from the corpus's own vocabulary, senders and subjects."""
    words: Counter[str] = Counter()
    senders: Counter[str] = Counter()
    phrases: list[str] = []
    for raw in base[:400]:
        p = parse_message(raw)
        words.update(w.lower() for w in WORD.findall(p.subject + " " + p.text_body[:2000]))
        for a in p.from_:
            senders[a.email.split("@")[0]] += 1
        subj = [w for w in re.findall(r"[A-Za-z]{3,}", p.subject) if w.lower() not in ("re", "fwd", "patch")]
        if len(subj) >= 2:
            j = rnd.randrange(len(subj) - 1)
            phrases.append(f'"{subj[j]} {subj[j + 1]}"')
    common = [w for w, _ in words.most_common(400)][20:]  # skip the stop-word-like top
    top_senders = [s for s, _ in senders.most_common(30)]
    out = []
    for i in range(n):
        kind = ("word", "phrase", "from", "date", "attachment")[i % 5]
        if kind == "word":
            q = rnd.choice(common) if rnd.random() < 0.7 else f"{rnd.choice(common)} {rnd.choice(common)}"
        elif kind == "phrase":
            q = rnd.choice(phrases)
        elif kind == "from":
            q = f"from:{rnd.choice(top_senders)}"
        elif kind == "date":
            start = END - rnd.randrange(SPAN_S)
            first = datetime.fromtimestamp(start, UTC)
            last = datetime.fromtimestamp(start + rnd.choice([7, 30, 90]) * 86_400, UTC)
            q = f"after:{first:%Y/%m/%d} before:{last:%Y/%m/%d}" + (f" {rnd.choice(common)}" if rnd.random() < 0.5 else "")
        else:
            q = "has:attachment" + (f" {rnd.choice(common)}" if rnd.random() < 0.5 else "")
        out.append((kind, q))
    return out


async def wait_serving(addr: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{addr} not serving after {timeout}s")
            await asyncio.sleep(0.1)


def start(module: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen([sys.executable, "-m", module], env=env, stdout=out, stderr=out, cwd=REPO)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="mailmesh-bench-search-"))
    nats_port = free_port()
    conf = write_config(tmp / "nats", "127.0.0.1", nats_port)
    nats = subprocess.Popen([str(find_nats_server()), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    settings = load_settings(env={}, data_dir=str(tmp / "data"), nats_url=f"nats://127.0.0.1:{nats_port}",
                             mailbox_port=free_port(), search_port=free_port(), log_level="WARNING")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MAILMESH_")}, **settings_env(settings)}
    procs: list[subprocess.Popen[bytes]] = []
    result: dict[str, object] = {"messages": args.messages, "cpus": os.cpu_count()}
    try:
        await asyncio.sleep(0.5)
        mailbox = start("svc_mailbox", env, tmp / "mailbox.log")
        procs.append(mailbox)
        await wait_serving(settings.addr("mailbox"), mailbox)
        md = ((auth.TOKEN_KEY, settings.token()),)
        base = corpus()
        rnd = random.Random(42)
        async with grpc.aio.insecure_channel(settings.addr("mailbox")) as mch:
            mstub = mpb_grpc.MailboxServiceStub(mch)
            await mstub.CreateDomain(mpb.CreateDomainRequest(name="example.com"), metadata=md)
            acct = (await mstub.CreateAccount(mpb.CreateAccountRequest(
                email="bench@example.com", password="benchmark-password", quota_bytes=1 << 50),
                metadata=md)).account
            user = acct.user_id
            blobs = BlobStore(settings.data_dir / "blobs")

            async def deliver(i: int, raw: bytes, received: int) -> None:
                ref = await blobs.put(raw)
                await mstub.DeliverMessage(mpb.DeliverMessageRequest(
                    parent=f"users/{user}", ingest_id=f"bench-{i}", blob_ref=ref, target=mpb.DELIVERY_TARGET_INBOX,
                    received_time=Timestamp(seconds=received)), metadata=md, timeout=60)

            # 1. fill, search stopped
            todo = list(range(args.messages))
            step = max(1, SPAN_S // max(1, args.messages))

            async def filler() -> None:
                while todo:
                    i = todo.pop()
                    await deliver(i, message(i, base), END - SPAN_S + i * step)

            t0 = time.perf_counter()
            await asyncio.gather(*(filler() for _ in range(args.concurrency)))
            fill_s = time.perf_counter() - t0
            result["fill"] = {"deliveries_per_s": round(args.messages / fill_s, 1), "seconds": round(fill_s, 1)}
            print(f"filled {args.messages} messages in {fill_s:.1f}s", file=sys.stderr)

            # 2. indexing rate
            search = start("svc_search", env, tmp / "search.log")
            procs.append(search)
            t0 = time.perf_counter()
            await wait_serving(settings.addr("search"), search)
            async with grpc.aio.insecure_channel(settings.addr("search")) as sch:
                sstub = pb_grpc.SearchServiceStub(sch)
                umd = md + ((auth.USER_KEY, user),)
                while True:
                    st = await sstub.GetIndexStatus(pb.GetIndexStatusRequest(parent=f"users/{user}"), metadata=md)
                    if st.documents >= args.messages and st.pending_events == 0:
                        break
                    await asyncio.sleep(0.2)
                index_s = time.perf_counter() - t0
                size = sum(f.stat().st_size for f in (settings.data_dir / "search").rglob("*") if f.is_file())
                result["indexing"] = {"documents_per_s": round(args.messages / index_s, 1),
                                      "seconds": round(index_s, 1), "index_bytes": size}
                print(f"indexed in {index_s:.1f}s", file=sys.stderr)

                # 3. query latency
                mix = query_mix(base, rnd, args.queries)
                for _, q in mix[:20]:  # warm-up
                    await sstub.Search(pb.SearchRequest(parent="users/me", query=q, page_size=50), metadata=umd)
                per_kind: dict[str, list[float]] = {}
                hits: dict[str, list[int]] = {}
                for kind, q in mix:
                    t = time.perf_counter()
                    r = await sstub.Search(pb.SearchRequest(parent="users/me", query=q, page_size=50), metadata=umd)
                    per_kind.setdefault(kind, []).append((time.perf_counter() - t) * 1000)
                    hits.setdefault(kind, []).append(int(r.result_size_estimate))
                every = [x for v in per_kind.values() for x in v]
                result["query_latency"] = {"all": summary(every), **{
                    k: {**summary(v), "median_matches": int(statistics.median(hits[k]))} for k, v in per_kind.items()}}
                result["query_examples"] = [q for _, q in mix[:10]]

                # 4. lag under load
                lags: list[float] = []
                stop_load = asyncio.Event()
                counter = iter(range(args.messages, 10**9))

                async def load() -> None:
                    interval = 1.0 / args.load if args.load else 0
                    nxt = time.perf_counter()
                    while args.load and not stop_load.is_set():
                        i = next(counter)
                        asyncio.get_running_loop().create_task(deliver(i, message(i, base), int(time.time())))
                        nxt += interval
                        await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

                outstanding: dict[str, tuple[str, float]] = {}  # message id -> (probe word, acked at)
                probing = True

                async def probe(k: int) -> None:
                    word = f"probe{k}x{rnd.randrange(10**9)}"
                    i = next(counter)
                    ref = await blobs.put(message(i, base, extra_subject=f"Probe {word}"))
                    r = await mstub.DeliverMessage(mpb.DeliverMessageRequest(
                        parent=f"users/{user}", ingest_id=f"bench-{i}", blob_ref=ref,
                        target=mpb.DELIVERY_TARGET_INBOX, received_time=Timestamp(seconds=int(time.time()))),
                        metadata=md, timeout=60)
                    outstanding[r.message.id] = (word, time.perf_counter())

                async def poller() -> None:
                    # one query for every probe not yet found, every 5 ms: the polling itself
                    # must not load the service much more than real traffic would
                    while probing or outstanding:
                        if outstanding:
                            words = " OR ".join(w for w, _ in outstanding.values())
                            r = await sstub.Search(pb.SearchRequest(parent="users/me", query=f"subject:({words})",
                                                                    page_size=500), metadata=umd)
                            now = time.perf_counter()
                            for x in r.results:
                                found = outstanding.pop(x.message_id, None)
                                if found:
                                    lags.append((now - found[1]) * 1000)
                        await asyncio.sleep(0.005)

                loader = asyncio.create_task(load())
                polling = asyncio.create_task(poller())
                await asyncio.sleep(1.0)
                probes = []
                for k in range(args.probes):
                    probes.append(asyncio.create_task(probe(k)))
                    await asyncio.sleep(1.0 / args.probe_rate)
                await asyncio.gather(*probes)
                probing = False
                await asyncio.wait_for(polling, 120)
                stop_load.set()
                await loader
                result["index_lag"] = {**summary(lags), "background_deliveries_per_s": args.load,
                                       "probes_per_s": args.probe_rate}
    finally:
        for p in reversed(procs):
            stop(p)
        nats.terminate()
        nats.wait(10)
        if args.keep:
            print(f"data kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=32, help="concurrent deliveries while filling")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--probe-rate", type=float, default=10.0, help="lag probes delivered per second")
    ap.add_argument("--load", type=float, default=50.0, help="background deliveries per second during the lag test")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
