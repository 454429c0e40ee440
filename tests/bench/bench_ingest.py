"""Inbound SMTP benchmark: messages per second accepted durably (250 = blob fsync'd + INBOUND
publish acked) by a real `python -m svc_ingest`, and end-to-end latency from the 250 to the
message being visible in the recipient's INBOX (its MESSAGE_ADDED event on EVENTS, which the
mailbox publishes after the delivery committed), with and without PIPELINING.

Two latencies are reported per mode: under the full load (N connections sending as fast as
they can: when ingest accepts faster than the mailbox delivers, this is mostly time spent
queued in INBOUND), and unloaded (one connection, one message at a time, the next sent once
the previous one is visible: the latency of the path itself). `--rate R` offers R messages/s
in total instead of the full load: the latency an operator sees below capacity.

nats-server, `python -m svc_mailbox` and `python -m svc_ingest` run as separate processes on
loopback; a dnslib server answers the SPF/DKIM/DMARC lookups. The client is asyncio: N
concurrent connections, each sending its share of 10 kB messages to one of N users.

    .venv/bin/python -m tests.bench.bench_ingest --messages 5000 --connections 20
    .venv/bin/python -m tests.bench.bench_ingest --messages 5000 --connections 20 --ingest-workers 2

Besides the rates and latencies it prints, per run, the CPU time each process spent per
accepted message (`cpu_ms_per_message`, from /proc): on a machine shared with other work the
rates move with the load, the CPU cost much less. `--ingest-workers N` runs N svc_ingest
processes on one SMTP port (SO_REUSEPORT), as `mailmesh up` does with `ingest_workers = N`;
`--profile DIR` runs the services under cProfile. svc_ingest runs `--ingest-nice` (default: the
`ingest_nice` setting, 5) below the other processes' CPU priority, as it does under `mailmesh up`.

The blob store starts empty, so most puts of a run are the first into their `ab/cd` directory
(65,536 of them) and pay for creating it, which a store in use for a while no longer does;
`--premade-blob-dirs` creates them all first, to measure that steady state. The output says which
(`blob_store`).

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import nats
from mailmesh.v1 import events_pb2, types_pb2
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc
from nats.aio.msg import Msg

from mailmesh_common import auth
from mailmesh_common.config import Settings, load_settings, settings_env
from mailmesh_common.natsserver import NatsServer
from svc_ingest.server import open_spam_db
from svc_ingest.spam import SpamFilter
from tests.bench.common import cpu_seconds, free_port, summary, wait_port
from tests.conftest import REPO
from tests.dnsserver import DnsServer

MESSAGE_BYTES = 10 * 1024


def make_message(run: str, i: int, rcpt: str) -> bytes:
    head = (f"From: Bench Sender <sender@bench.test>\r\nTo: {rcpt}\r\nSubject: bench {run} {i}\r\n"
            f"Message-ID: <bench-{run}-{i}@bench.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog while the benchmark keeps counting.\r\n"
    body = line * ((MESSAGE_BYTES - len(head)) // len(line) + 1)
    return (head + body)[:MESSAGE_BYTES - 2] + b"\r\n"


class SmtpClient:
    """A minimal SMTP client that can pipeline (RFC 2920)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> SmtpClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        c = cls(reader, writer)
        await c.reply()
        writer.write(b"EHLO bench.client.test\r\n")
        code, text = await c.reply()
        assert code == 250 and b"PIPELINING" in text, text
        return c

    async def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"".join(lines)

    async def send(self, mail_from: str, rcpt: str, data: bytes, pipelining: bool) -> int:
        cmds = [f"MAIL FROM:<{mail_from}> SIZE={len(data)}\r\n".encode(), f"RCPT TO:<{rcpt}>\r\n".encode(),
                b"DATA\r\n"]
        if pipelining:
            self.writer.write(b"".join(cmds))
            codes = [(await self.reply())[0] for _ in cmds]
        else:
            codes = []
            for cmd in cmds:
                self.writer.write(cmd)
                codes.append((await self.reply())[0])
        if codes[-1] != 354:
            if codes[-1] == 250:
                raise AssertionError("DATA accepted without 354")
            self.writer.write(b"RSET\r\n")
            await self.reply()
            return codes[1] if codes[1] != 250 else codes[-1]
        self.writer.write(data + b".\r\n")
        return (await self.reply())[0]

    async def close(self) -> None:
        self.writer.write(b"QUIT\r\n")
        try:
            await self.reply()
        except ConnectionError:
            pass
        self.writer.close()


PROFILE_DIR: Path | None = None


def premake_blob_dirs(root: Path) -> None:
    """The blob store's ab/cd directories, all of them, made durable (BlobStore's layout)."""
    for a in range(256):
        for b in range(256):
            (root / f"{a:02x}" / f"{b:02x}").mkdir(parents=True, exist_ok=True)
    os.sync()


def spawn(module: str, settings: Settings, logs: Path, suffix: str = "") -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILMESH_")}
    env.update(settings_env(settings))
    profile = ["-m", "cProfile", "-o", str(PROFILE_DIR / f"{module}{suffix}.prof")] if PROFILE_DIR else []
    with open(logs / f"{module}{suffix}.log", "wb") as out:
        return subprocess.Popen([sys.executable, *profile, "-m", module], env=env, stdout=out, stderr=out,
                                cwd=settings.data_dir)




async def run_load(port: int, run: str, rcpts: list[str], n: int, connections: int,
                   pipelining: bool, rate: float = 0.0) -> tuple[float, dict[int, float], dict[int, int]]:
    """Sends n messages over `connections` connections, as fast as they go or, with `rate`,
    message i not before i / rate seconds from the start (an offered load below capacity);
    (elapsed s, index -> 250 time, codes)."""
    acked: dict[int, float] = {}
    codes: dict[int, int] = {}
    data = {i: make_message(run, i, rcpts[i % len(rcpts)]) for i in range(n)}
    todo = iter(range(n))
    t0 = time.monotonic()

    async def conn(k: int) -> None:
        c = await SmtpClient.connect(port)
        try:
            for i in todo:
                if rate > 0:
                    await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                code = await c.send("sender@bench.test", rcpts[i % len(rcpts)], data[i], pipelining)
                codes[i] = code
                if code == 250:
                    acked[i] = time.monotonic()
        finally:
            await c.close()

    await asyncio.gather(*(conn(k) for k in range(connections)))
    return time.monotonic() - t0, acked, codes


UNLOADED_TX: list[tuple[float, int]] = []




def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}




async def probe(port: int, rcpt: str, n: int, pipelining: bool, arrivals: asyncio.Queue[float]) -> list[float]:
    """One message at a time on one connection; each latency is 250 -> its MESSAGE_ADDED event."""
    c = await SmtpClient.connect(port)
    out = []
    try:
        for i in range(n):
            while not arrivals.empty():
                arrivals.get_nowait()
            data = make_message("probe-" + ("p" if pipelining else "l"), i, rcpt)
            t0 = time.monotonic()
            code = await c.send("sender@bench.test", rcpt, data, pipelining)
            acked = time.monotonic()
            UNLOADED_TX.append((acked - t0, code))
            if code != 250:
                continue
            seen = await asyncio.wait_for(arrivals.get(), 30)
            out.append(seen - acked)
    finally:
        await c.close()
    return out


async def train_spam_model(settings: Settings, n: int) -> dict[str, int]:
    """Trains the spam model ingest will use (its KV in the data dir) on up to n spam and n ham
    of the corpus, fitting the combiner, as `mailmesh spam train` would."""
    corpus = REPO.parent / "shared" / "corpus" / "spam"
    if n <= 0 or not corpus.is_dir():
        return {"spam": 0, "ham": 0}
    spam = sorted(p for d in corpus.iterdir() if d.is_dir() and d.name.startswith("spam")
                  for p in d.iterdir() if p.is_file())[:n]
    ham = sorted(p for d in corpus.iterdir() if d.is_dir() and "ham" in d.name
                 for p in d.iterdir() if p.is_file())[:n]
    db = open_spam_db(settings)
    try:
        flt = SpamFilter(db)
        await flt.train_many([(p.read_bytes(), True) for p in spam] + [(p.read_bytes(), False) for p in ham],
                             fit=True)
    finally:
        await db.close()
    return {"spam": len(spam), "ham": len(ham)}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--probes", type=int, default=200, help="messages for the unloaded latency")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    ap.add_argument("--ingest-workers", type=int, default=1, help="svc_ingest processes sharing the SMTP port")
    ap.add_argument("--ingest-nice", type=int, default=Settings.ingest_nice, metavar="N",
                    help="svc_ingest's CPU priority below the others (MAILMESH_INGEST_NICE; 0: the same)")
    ap.add_argument("--premade-blob-dirs", action="store_true",
                    help="create the blob store's 65,536 ab/cd directories first, as in a store in use for a while")
    ap.add_argument("--rate", type=float, default=0.0, metavar="R",
                    help="offer R messages/s in total instead of sending as fast as possible: the latency "
                         "under a load below capacity (0: as fast as possible)")
    ap.add_argument("--profile", metavar="DIR", help="run the services under cProfile, writing DIR/<module>.prof")
    ap.add_argument("--train", type=int, default=1000, metavar="N",
                    help="train the spam model on N spam + N ham of ../shared/corpus/spam first, so the filter "
                         "reads token counts as it does in production (0: untrained, rules only)")
    args = ap.parse_args()
    global PROFILE_DIR
    if args.profile:
        PROFILE_DIR = Path(args.profile).resolve()
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix="mailmesh-bench-ingest-"))
    logs = tmp / "logs"
    logs.mkdir()
    natsd = NatsServer(tmp / "nats", "127.0.0.1", free_port())
    natsd.start_and_wait()
    dns = DnsServer()
    dns.start()
    dns.add("bench.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        settings = load_settings(
            env={}, data_dir=str(tmp / "data"), nats_url=natsd.url, mailbox_port=free_port(),
            ingest_port=free_port(), smtp_port=free_port(), dns_servers=dns.address, log_level="WARNING",
            smtp_hostname="mx.bench.test", per_ip_max_connections=0, per_ip_messages_per_minute=0,
            ingest_workers=args.ingest_workers, ingest_nice=args.ingest_nice)
        settings.data_dir.mkdir(parents=True)
        if args.premade_blob_dirs:
            premake_blob_dirs(settings.data_dir / "blobs")
        trained = await train_spam_model(settings, args.train)
        procs.append(spawn("svc_mailbox", settings, logs))
        await wait_port(settings.mailbox_port, procs[0])
        md = ((auth.TOKEN_KEY, settings.token()),)
        channel = grpc.aio.insecure_channel(settings.addr("mailbox"))
        stub = pb_grpc.MailboxServiceStub(channel)
        await stub.CreateDomain(pb.CreateDomainRequest(name="example.com"), metadata=md, wait_for_ready=True,
                                timeout=30)
        users: dict[str, str] = {}
        for k in range(args.connections):
            addr = f"user{k}@example.com"
            acct = (await stub.CreateAccount(pb.CreateAccountRequest(email=addr, password="benchmark-password"),
                                             metadata=md)).account
            users[addr] = acct.user_id
        for k in range(args.ingest_workers):  # as `mailmesh up` runs them: one port, SO_REUSEPORT
            procs.append(spawn("svc_ingest", settings, logs, suffix=f"-{k + 1}" if k else ""))
            await wait_port(settings.smtp_port, procs[-1])
            await wait_port(settings.ingest_port, procs[-1])

        nc = await nats.connect(natsd.url)
        visible: dict[tuple[str, str], float] = {}
        arrivals: asyncio.Queue[float] = asyncio.Queue()

        async def on_event(msg: Msg) -> None:
            ev = events_pb2.MailboxEvent.FromString(msg.data)
            if ev.change.type == types_pb2.CHANGE_TYPE_MESSAGE_ADDED and "INBOX" in ev.change.label_ids:
                now = time.monotonic()
                visible[(ev.change.user_id, ev.change.message_id)] = now
                arrivals.put_nowait(now)

        await nc.subscribe("mailbox.events.>", cb=on_event)
        rcpts = list(users)
        pids = {"svc_mailbox": procs[0].pid}
        pids.update({"svc_ingest" + (f"-{k + 1}" if k else ""): p.pid for k, p in enumerate(procs[1:])})
        if natsd.proc is not None:
            pids["nats-server"] = natsd.proc.pid
        # warm up: connections, code paths, caches
        await run_load(settings.smtp_port, "warmup", rcpts, min(200, args.messages), args.connections, True)

        results = {}
        for pipelining in (True, False):
            run = "pipelined" if pipelining else "lockstep"
            cpu_before = cpu_snapshot(pids)
            seen_before = len(visible)
            elapsed, acked, codes = await run_load(settings.smtp_port, run, rcpts, args.messages,
                                                   args.connections, pipelining, args.rate)
            # CPU is sampled once every accepted message is visible (by its event, without polling
            # the mailbox, whose listing would add to its CPU)
            deadline = time.monotonic() + 300
            while len(visible) - seen_before < len(acked) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            cpu_after = cpu_snapshot(pids)
            # wait until every accepted message is visible, then map mailbox ids to bench indexes
            deadline = time.monotonic() + 300
            index: dict[tuple[str, str], int] = {}
            while time.monotonic() < deadline:
                index.clear()
                for uid in users.values():
                    token = ""
                    while True:
                        page = await stub.ListMessages(pb.ListMessagesRequest(
                            parent=f"users/{uid}", label_id="INBOX", page_size=500, page_token=token,
                            format=types_pb2.MESSAGE_FORMAT_METADATA), metadata=md)
                        for m in page.messages:
                            prefix = f"bench-{run}-"
                            if m.message_id_header.startswith(prefix):
                                index[(uid, m.id)] = int(m.message_id_header[len(prefix):].split("@")[0])
                        token = page.next_page_token
                        if not token:
                            break
                if len(index) >= len(acked) and all(k in visible for k in index):
                    break
                await asyncio.sleep(0.5)
            latencies = [visible[k] - acked[i] for k, i in index.items() if k in visible and i in acked]
            seen_times = sorted(visible[k] for k in index if k in visible)
            first_ack = min(acked.values(), default=0.0)
            visible_per_s = (round(len(seen_times) / (seen_times[-1] - first_ack), 1)
                             if seen_times and seen_times[-1] > first_ack else None)
            refused: dict[int, int] = {}
            for c in codes.values():
                if c != 250:
                    refused[c] = refused.get(c, 0) + 1
            unloaded = await probe(settings.smtp_port, rcpts[0], args.probes, pipelining, arrivals)
            results[run] = {
                "messages": args.messages, "accepted": len(acked), "refused_by_code": refused,
                "accepted_per_s": round(len(acked) / elapsed, 1), "elapsed_s": round(elapsed, 2),
                "visible_in_inbox": len(latencies),
                "visible_per_s": visible_per_s,
                "cpu_ms_per_message": {name: round((cpu_after[name] - cpu_before[name]) * 1000 / max(len(acked), 1), 2)
                                       for name in pids},
                "latency_250_to_inbox_ms_under_load": summary(latencies),
                "latency_250_to_inbox_ms_unloaded": summary(unloaded),
                "smtp_transaction_ms_unloaded": summary([t for t, _ in UNLOADED_TX]),
            }
            UNLOADED_TX.clear()
        await nc.close()
        await channel.close()
        print(json.dumps({"message_bytes": MESSAGE_BYTES, "connections": args.connections,
                          "blob_store": "all ab/cd directories made beforehand" if args.premade_blob_dirs
                          else "fresh: most puts create their ab/cd directory",
                          "offered_per_s": args.rate or "as fast as accepted",
                          "ingest_workers": args.ingest_workers, "ingest_nice": args.ingest_nice, "spam_model_trained_on": trained,
                          "cores": os.cpu_count(), "runs": results}, indent=2))
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        dns.stop()
        natsd.stop()
        if args.keep:
            print(f"data and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
