"""Sending benchmark: messages per second from the Send RPC to delivered, and latency p50/p99,
on two paths:

  remote  Send -> SENT copy, DKIM (rsa-sha256 + ed25519-sha256), OUTBOUND -> delivery worker ->
          MX lookup (loopback DNS) -> SMTP with STARTTLS -> a local sink (aiosmtpd); "delivered"
          is the sink's end of DATA
  local   Send -> SENT copy, signing, INBOUND -> svc_mailbox delivery; "delivered" is the
          recipient's MESSAGE_ADDED event on EVENTS (published after the delivery committed)

nats-server, `python -m svc_mailbox` and `python -m svc_send` run as separate processes on
loopback; the sink, the DNS server and the client run in this process. The undo window is 0
(it would add its length to every latency). Two latencies per path: under load (C concurrent
Send calls, as fast as they go) and unloaded (one message at a time, the next sent once the
previous one arrived).

    .venv/bin/python -m tests.bench.bench_send --messages 500 --concurrency 16

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import nats
from aiosmtpd.smtp import SMTP, Envelope, Session
from mailmesh.v1 import events_pb2, types_pb2
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc
from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import send_service_pb2_grpc as spb_grpc
from nats.aio.msg import Msg

from mailmesh_common import auth
from mailmesh_common.config import Settings, load_settings, settings_env
from mailmesh_common.natsserver import NatsServer
from svc_send.dkim_keys import DkimKeyFiles, dkim_root
from svc_send.tls import self_signed
from tests.bench.common import cpu_seconds, free_port, summary, wait_port
from tests.dnsserver import DnsServer

REMOTE = "remote.test"
BODY = "The quick brown fox jumps over the lazy dog while the benchmark keeps counting.\n" * 60  # ~5 kB
_SUBJECT = re.compile(rb"^Subject: bench (\w+) (\d+)\r?$", re.MULTILINE)






# the event loop thread's CPU time (not wall time, which a busy machine inflates); threads apart
_PROFILED = """
import cProfile, runpy, time
p = cProfile.Profile(time.thread_time)
p.enable()
try:
    runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
finally:
    p.disable()
    p.dump_stats({out!r})
"""


def spawn(module: str, settings: Settings, logs: Path, profile: Path | None = None) -> subprocess.Popen[bytes]:
    """`python -m module`; under cProfile (written to profile/<module>.prof when it stops) if asked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILMESH_")}
    env.update(settings_env(settings))
    argv = [sys.executable, "-m", module]
    if profile is not None:
        profile.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-c", _PROFILED.format(out=str(profile / f"{module}.prof"), module=module)]
    with open(logs / f"{module}.log", "wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=out, cwd=Path(__file__).resolve().parents[2])




class Sink:
    """The remote MX: accepts everything, notes when each bench message arrived."""

    def __init__(self) -> None:
        self.arrived: dict[tuple[str, int], float] = {}
        self.event = asyncio.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content
        assert isinstance(content, bytes)
        m = _SUBJECT.search(content.split(b"\r\n\r\n", 1)[0])
        if m:
            self.arrived[(m.group(1).decode(), int(m.group(2)))] = time.monotonic()
            self.event.set()
        return "250 2.0.0 OK"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=500, help="messages per path under load")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent Send calls")
    ap.add_argument("--probes", type=int, default=50, help="messages per path for the unloaded latency")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    ap.add_argument("--paths", default="remote,local", help="which paths to measure (remote, local or both)")
    ap.add_argument("--profile", type=Path, help="run svc_send and svc_mailbox under cProfile, writing "
                                                  "DIR/svc_send.prof and DIR/svc_mailbox.prof")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mailmesh-bench-send-"))
    logs = tmp / "logs"
    logs.mkdir()
    natsd = NatsServer(tmp / "nats", "127.0.0.1", free_port())
    natsd.start_and_wait()
    natsd_pid = natsd.proc.pid if natsd.proc is not None else 0
    dns = DnsServer().start()
    dns.add(REMOTE, "MX", (10, f"mx.{REMOTE}"))
    dns.add(f"mx.{REMOTE}", "A", "127.0.0.1")
    sink = Sink()
    cert, key = self_signed(tmp / "sink-tls", f"mx.{REMOTE}")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(str(cert), str(key))
    loop = asyncio.get_running_loop()
    sink_server = await loop.create_server(
        lambda: SMTP(sink, hostname=f"mx.{REMOTE}", tls_context=tls, decode_data=False, auth_require_tls=False),
        "127.0.0.1", 0)
    sink_port = int(sink_server.sockets[0].getsockname()[1])
    procs: list[subprocess.Popen[bytes]] = []
    try:
        settings = load_settings(
            env={}, data_dir=str(tmp / "data"), nats_url=natsd.url, mailbox_port=free_port(), send_port=free_port(),
            submission_port=free_port(), dns_servers=dns.address, log_level="WARNING",
            smtp_hostname="mail.example.com", outbound_smtp_port=sink_port, undo_send_s=0,
            sends_per_day=10**9)
        settings.data_dir.mkdir(parents=True)
        keys = DkimKeyFiles(dkim_root(settings.data_dir))  # imported by svc_send at start
        for selector, algorithm in (("rsa1", "rsa"), ("ed1", "ed25519")):
            k = keys.generate("example.com", selector, algorithm)
            dns.add(k.record_name, "TXT", k.txt_record())
        procs.append(spawn("svc_mailbox", settings, logs, args.profile))
        await wait_port(settings.mailbox_port, procs[0])
        md = ((auth.TOKEN_KEY, settings.token()),)
        mb_channel = grpc.aio.insecure_channel(settings.addr("mailbox"))
        mb = pb_grpc.MailboxServiceStub(mb_channel)
        await mb.CreateDomain(pb.CreateDomainRequest(name="example.com"), metadata=md, wait_for_ready=True,
                              timeout=30)
        ids = {}
        for name in ("alice", "bob"):
            acct = (await mb.CreateAccount(pb.CreateAccountRequest(email=f"{name}@example.com",
                                                                   password="benchmark-password",
                                                                   display_name=name.title()), metadata=md)).account
            ids[name] = acct.user_id
        procs.append(spawn("svc_send", settings, logs, args.profile))
        await wait_port(settings.send_port, procs[1])
        send_channel = grpc.aio.insecure_channel(settings.addr("send"))
        stub = spb_grpc.SendServiceStub(send_channel)
        alice_md = md + ((auth.USER_KEY, ids["alice"]),)

        nc = await nats.connect(natsd.url)
        local_seen: dict[str, float] = {}  # bob's message id -> when visible
        local_event = asyncio.Event()

        async def on_event(msg: Msg) -> None:
            ev = events_pb2.MailboxEvent.FromString(msg.data)
            if ev.change.type == types_pb2.CHANGE_TYPE_MESSAGE_ADDED and "INBOX" in ev.change.label_ids:
                local_seen[ev.change.message_id] = time.monotonic()
                local_event.set()

        await nc.subscribe(f"mailbox.events.{ids['bob']}", cb=on_event)

        async def send_one(path: str, run: str, i: int) -> tuple[float, float]:
            rcpt = f"dave@{REMOTE}" if path == "remote" else "bob@example.com"
            t0 = time.monotonic()
            await stub.Send(spb.SendRequest(parent="users/me", to=[types_pb2.Address(email=rcpt)],
                                            subject=f"bench {run} {i}", text_body=BODY),
                            metadata=alice_md, timeout=60, wait_for_ready=True)
            return t0, time.monotonic()

        async def local_index(run: str) -> dict[int, str]:
            """bench index -> bob's message id, for the messages of `run`."""
            out: dict[int, str] = {}
            token = ""
            while True:
                page = await mb.ListMessages(pb.ListMessagesRequest(
                    parent=f"users/{ids['bob']}", label_id="INBOX", page_size=500, page_token=token,
                    format=types_pb2.MESSAGE_FORMAT_METADATA), metadata=md)
                for m in page.messages:
                    parts = m.subject.split()
                    if len(parts) == 3 and parts[0] == "bench" and parts[1] == run:
                        out[int(parts[2])] = m.id
                token = page.next_page_token
                if not token:
                    return out

        async def arrivals(path: str, run: str, n: int) -> dict[int, float]:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if path == "remote":
                    got = {i: t for (r, i), t in sink.arrived.items() if r == run}
                else:
                    idx = await local_index(run)
                    got = {i: local_seen[mid] for i, mid in idx.items() if mid in local_seen}
                if len(got) >= n:
                    return got
                await asyncio.sleep(0.2)
            raise RuntimeError(f"{path}: only some messages arrived")

        # warm up every path (connections, caches, JIT-free but lazy imports)
        paths = [p for p in ("remote", "local") if p in args.paths.split(",")]
        for path in paths:
            warm = f"w{path}"
            await asyncio.gather(*(send_one(path, warm, i) for i in range(20)))
            await arrivals(path, warm, 20)

        results: dict[str, Any] = {}
        for path in paths:
            run = f"load{path}"
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(args.messages):
                queue.put_nowait(i)
            started: dict[int, float] = {}
            rpc: list[float] = []

            async def worker(p: str = path, r: str = run, q: asyncio.Queue[int] = queue,
                             st: dict[int, float] = started, lat: list[float] = rpc) -> None:
                while not q.empty():
                    i = q.get_nowait()
                    t0, t1 = await send_one(p, r, i)
                    st[i] = t0
                    lat.append(t1 - t0)

            watched = {"svc_mailbox": procs[0].pid, "svc_send": procs[1].pid, "nats-server": natsd_pid,
                       "bench (client, sink, dns)": os.getpid()}
            cpu0 = {k: cpu_seconds(v) for k, v in watched.items()}
            t_start = time.monotonic()
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            t_sent = time.monotonic()
            got = await arrivals(path, run, args.messages)
            t_done = max(got.values())
            cpu_ms = {k: round((cpu_seconds(v) - cpu0[k]) * 1000 / args.messages, 1) for k, v in watched.items()}
            latencies = [got[i] - started[i] for i in got]

            probe = f"probe{path}"
            unloaded = []
            for i in range(args.probes):
                t0, _ = await send_one(path, probe, i)
                arrived = await arrivals(path, probe, i + 1)
                unloaded.append(arrived[i] - t0)
            results[path] = {
                "messages": args.messages,
                "send_rpc_per_s": round(args.messages / (t_sent - t_start), 1),
                "delivered_per_s": round(args.messages / (t_done - t_start), 1),
                "send_rpc_ms": summary(rpc),
                "send_to_delivered_ms_under_load": summary(latencies),
                "send_to_delivered_ms_unloaded": summary(unloaded),
                "cpu_ms_per_message_under_load": cpu_ms,
            }
        await nc.close()
        await send_channel.close()
        await mb_channel.close()
        print(json.dumps({"message_bytes_approx": len(BODY) + 1200, "concurrency": args.concurrency,
                          "cores": os.cpu_count(), "paths": results}, indent=2))
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(60 if args.profile else 15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        sink_server.close()
        dns.stop()
        natsd.stop()
        if args.keep:
            print(f"data and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
