"""Per-IP limits (concurrent connections 421 4.7.0, messages per minute 451 4.7.1) and the size
limit enforced while DATA is read: a 30 MB message is refused with 552 5.3.4 without the
service's memory growing by anything like 30 MB (measured on a `python -m svc_ingest` child)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailmesh_common.config import Settings, settings_env
from mailmesh_common.limits import ConnectionLimiter
from svc_ingest.limits import RateLimiter
from tests.dnsserver import DnsServer
from tests.svc_ingest.conftest import (
    IngestMesh,
    Nats,
    free_port,
    in_thread,
    ingest_settings,
    message,
    reply_of,
    start_ingest_mesh,
    stop_ingest_mesh,
)
from tests.svc_ingest.test_ingest_service import inbound_last_seq
from tests.svc_mailbox.conftest import start_mesh, stop_mesh

MiB = 1024 * 1024


# --- the limiters on their own --------------------------------------------------------------------

def test_connection_limiter_counts_per_ip() -> None:
    lim = ConnectionLimiter(2)
    assert lim.acquire("192.0.2.1") and lim.acquire("192.0.2.1")
    assert not lim.acquire("192.0.2.1")
    assert lim.acquire("192.0.2.2")
    lim.release("192.0.2.1")
    assert lim.acquire("192.0.2.1")
    assert ConnectionLimiter(0).acquire("x")  # 0 = unlimited


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    """Any address of a /64 is the same site: rotating through it does not escape the limits."""
    lim = ConnectionLimiter(2)
    assert lim.acquire("2001:db8:1:2::1") and lim.acquire("2001:db8:1:2:ffff:ffff:ffff:ffff")
    assert not lim.acquire("2001:db8:1:2::abcd")
    assert lim.acquire("2001:db8:1:3::1")  # another /64
    lim.release("2001:db8:1:2::1")
    assert lim.open_connections("2001:db8:1:2::99") == 1
    assert lim.acquire("2001:db8:1:2::7")
    # an IPv4 client on a dual-stack listener is the IPv4 address
    assert lim.acquire("::ffff:192.0.2.1") and lim.acquire("192.0.2.1") and not lim.acquire("::ffff:192.0.2.1")

    now = [1000.0]
    rate = RateLimiter(3, clock=lambda: now[0])
    assert all(rate.allow(f"2001:db8:5:6::{i:x}") for i in range(1, 4))
    assert not rate.allow("2001:db8:5:6::ffff")
    assert rate.allow("2001:db8:5:7::1")


def test_rate_limiter_refills_over_a_minute() -> None:
    now = [1000.0]
    lim = RateLimiter(6, clock=lambda: now[0])
    assert all(lim.allow("192.0.2.1") for _ in range(6))
    assert not lim.allow("192.0.2.1")
    assert lim.allow("192.0.2.9")  # other addresses have their own budget
    now[0] += 10  # 6 a minute: one every 10 s
    assert lim.allow("192.0.2.1")
    assert not lim.allow("192.0.2.1")
    assert all(RateLimiter(0).allow("x") for _ in range(1000))


# --- over SMTP ------------------------------------------------------------------------------------

@pytest.fixture
async def limited(tmp_path: Path, nats: Nats, dns_server: DnsServer) -> AsyncIterator[IngestMesh]:
    m = await start_ingest_mesh(tmp_path, nats, dns_server, per_ip_max_connections=2,
                                per_ip_messages_per_minute=3, max_message_bytes=200_000)
    try:
        yield m
    finally:
        await stop_ingest_mesh(m)


async def connect_when_free(m: IngestMesh) -> smtplib.SMTP:
    """A new connection, once the server has seen an earlier one close and freed its slot."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return await in_thread(m.smtp)
        except smtplib.SMTPConnectError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def test_third_concurrent_connection_from_one_ip_gets_421(limited: IngestMesh) -> None:
    first, second = await in_thread(limited.smtp), await in_thread(limited.smtp)
    try:
        with pytest.raises(smtplib.SMTPConnectError) as err:
            await in_thread(limited.smtp)
        assert reply_of(err.value) == (421, b"4.7.0 Too many connections from your address, try again later")
        await in_thread(first.quit)
        third = await connect_when_free(limited)
        assert (await in_thread(third.noop))[0] == 250
        await in_thread(third.quit)
    finally:
        await in_thread(second.close)


async def test_connections_past_the_process_limit_get_421_whoever_they_come_from(
        tmp_path: Path, nats: Nats, dns_server: DnsServer) -> None:
    m = await start_ingest_mesh(tmp_path, nats, dns_server, smtp_max_connections=2)
    try:
        first, second = await in_thread(m.smtp), await in_thread(m.smtp)
        try:
            with pytest.raises(smtplib.SMTPConnectError) as err:
                await in_thread(m.smtp)
            assert reply_of(err.value) == (421, b"4.3.2 Too many connections, try again later")
            await in_thread(first.quit)
            third = await connect_when_free(m)
            assert await in_thread(send_one, third) == {}
            await in_thread(third.quit)
            await m.wait_subject("alice", "through a free session")
        finally:
            await in_thread(second.close)
    finally:
        await stop_ingest_mesh(m)


async def test_idle_timeout_bounds_silence_during_data_not_its_length(
        tmp_path: Path, nats: Nats, dns_server: DnsServer) -> None:
    """smtp_timeout_s is per read: a slow sender whose DATA lasts longer than it is served; one
    that goes silent mid-DATA for longer, or trickles bytes below the minimum rate, is cut off and
    nothing of its message is kept."""
    m = await start_ingest_mesh(tmp_path, nats, dns_server, smtp_timeout_s=1.5)

    def trickle(pause_s: float, pieces: int, stall_s: float, max_s: float = 30.0) -> tuple[int, bytes] | str:
        raw = message("trickled in", to="bob@example.com", body="a line of the body\r\n" * 600)
        with m.smtp() as s:
            s.ehlo()
            s.mail("s@remote.test")
            s.rcpt("bob@example.com")
            assert s.docmd("DATA")[0] == 354
            step = len(raw) // pieces + 1
            give_up = time.monotonic() + max_s
            try:
                for i in range(0, len(raw), step):
                    s.send(raw[i:i + step])
                    time.sleep(pause_s)
                    if time.monotonic() > give_up:
                        return "still open"
                time.sleep(stall_s)
                s.send(b".\r\n")
                return s.getreply()
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                return type(exc).__name__

    try:
        before = await inbound_last_seq(m)
        # 12 pieces 0.3 s apart: 3.6 s of DATA, never 1.5 s of silence
        got = await in_thread(trickle, 0.3, 12, 0.0)
        assert isinstance(got, tuple) and got[0] == 250, got
        await m.wait_subject("bob", "trickled in")
        # silent for 3 s before the final dot: the server hangs up, nothing handed off
        after_first = await inbound_last_seq(m)
        assert after_first == before + 1
        got = await in_thread(trickle, 0.0, 2, 3.0)
        assert got in ("SMTPServerDisconnected", "BrokenPipeError", "ConnectionResetError"), got
        assert await inbound_last_seq(m) == after_first
        # a few bytes every 0.5 s: never 1.5 s of silence, but far below MIN_DATA_RATE (500 B/s)
        got = await in_thread(trickle, 0.5, 2000, 0.0, 10.0)
        assert got in ("SMTPServerDisconnected", "BrokenPipeError", "ConnectionResetError"), got
        assert await inbound_last_seq(m) == after_first
    finally:
        await stop_ingest_mesh(m)


def send_one(s: smtplib.SMTP) -> dict[str, tuple[int, bytes]]:
    return s.sendmail("s@remote.test", ["alice@example.com"], message("through a free session"))


async def test_messages_over_the_per_minute_rate_get_451(limited: IngestMesh) -> None:
    def run() -> list[tuple[int, bytes]]:
        with limited.smtp() as s:
            s.ehlo()
            out = []
            for _ in range(4):
                out.append(s.docmd("MAIL FROM:<s@remote.test>"))
                s.rset()
            return out

    replies = await in_thread(run)
    assert replies[:3] == [(250, b"2.1.0 Sender OK")] * 3
    assert replies[3] == (451, b"4.7.1 Too many messages from your address, try again later")


@pytest.fixture
async def strict(tmp_path: Path, nats: Nats, dns_server: DnsServer) -> AsyncIterator[IngestMesh]:
    m = await start_ingest_mesh(tmp_path, nats, dns_server, smtp_max_errors=5)
    try:
        yield m
    finally:
        await stop_ingest_mesh(m)


def probe_session(m: IngestMesh, *commands: str) -> list[tuple[int, bytes]]:
    """EHLO, then each command; the replies up to the server closing the connection."""
    out = []
    with m.smtp() as s:
        s.ehlo()
        for c in commands:
            try:
                out.append(s.docmd(c))
            except smtplib.SMTPServerDisconnected:
                out.append((-1, b"disconnected"))
                break
    return out


async def test_a_session_past_the_error_limit_gets_421_and_is_closed(strict: IngestMesh) -> None:
    # probing for addresses: the 6th unknown recipient ends the session
    probes = [f"RCPT TO:<nobody{i}@example.com>" for i in range(8)]
    replies = await in_thread(probe_session, strict, "MAIL FROM:<s@remote.test>", *probes)
    assert replies[1:6] == [(550, b"5.1.1 No such user")] * 5
    assert replies[6] == (421, b"4.7.0 Too many errors, closing the connection")
    assert replies[7] == (-1, b"disconnected")


async def test_an_accepted_message_forgives_earlier_errors(strict: IngestMesh) -> None:
    def run() -> tuple[list[tuple[int, bytes]], dict[str, tuple[int, bytes]], list[tuple[int, bytes]]]:
        with strict.smtp() as s:
            s.ehlo()
            before = [s.docmd("MAIL FROM:<s@remote.test>")] + [s.docmd(f"RCPT TO:<x{i}@example.com>") for i in range(4)]
            s.rset()
            refused = s.sendmail("s@remote.test", ["bob@example.com"], message("after errors", to="bob@example.com"))
            after = [s.docmd("MAIL FROM:<s@remote.test>")] + [s.docmd(f"RCPT TO:<y{i}@example.com>") for i in range(4)]
            after.append(s.docmd("NOOP"))
            return before, refused, after

    before, refused, after = await in_thread(run)
    assert before[1:] == [(550, b"5.1.1 No such user")] * 4 and refused == {}
    assert after[1:5] == [(550, b"5.1.1 No such user")] * 4 and after[5] == (250, b"2.0.0 OK")
    await strict.wait_subject("bob", "after errors")


async def test_more_than_100_recipients_is_not_an_error(strict: IngestMesh) -> None:
    rcpts = [f"RCPT TO:<{u}@example.com>" for u in ("alice", "bob", "carol") * 36]
    replies = await in_thread(probe_session, strict, "MAIL FROM:<s@remote.test>", *rcpts, "NOOP")
    assert replies[101:108] == [(452, b"4.5.3 Too many recipients")] * 7 and replies[-1] == (250, b"2.0.0 OK")


async def test_noop_flood_is_cut_off(strict: IngestMesh) -> None:
    replies = await in_thread(probe_session, strict, *["NOOP"] * 102)
    assert replies[:100] == [(250, b"2.0.0 OK")] * 100
    assert replies[100] == (421, b"4.7.0 NOOP sent too many times")


async def test_message_over_the_size_limit_without_size_gets_552_after_data(limited: IngestMesh) -> None:
    big = message("too big", body="x" * 76 + "\r\n") * 1  # header + one line
    big += (b"y" * 998 + b"\r\n") * 250  # ~250 kB > 200_000

    def run() -> tuple[tuple[int, bytes], tuple[int, bytes], tuple[int, bytes]]:
        with limited.smtp() as s:
            s.ehlo()
            s.docmd("MAIL FROM:<s@remote.test>")  # no SIZE: the limit is found while reading
            s.docmd("RCPT TO:<alice@example.com>")
            code, _ = s.docmd("DATA")
            assert code == 354
            s.send(big + b".\r\n")
            over = s.getreply()
            return over, s.docmd("NOOP"), s.docmd("MAIL FROM:<s@remote.test> SIZE=200001")

    over, noop, declared = await in_thread(run)
    assert over == (552, b"5.3.4 Message too big for system")
    assert noop == (250, b"2.0.0 OK")  # the session goes on
    assert declared == (552, b"5.3.4 Message too big for system")
    assert not await limited.messages("alice")


# --- 30 MB against a real `python -m svc_ingest` ----------------------------------------------------

def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


@contextlib.asynccontextmanager
async def ingest_child(tmp_path: Path, settings: Settings) -> AsyncIterator[subprocess.Popen[bytes]]:
    """`python -m svc_ingest` on settings, as `mailmesh up` runs it, listening; stopped after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILMESH_")}
    env.update(settings_env(settings))
    log = tmp_path / "svc_ingest.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "svc_ingest"], env=env, stdout=out, stderr=out, cwd=tmp_path)
    try:
        await in_thread(_wait_port, settings.smtp_port, proc, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"svc_ingest exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"svc_ingest did not listen within {timeout}s:\n{log.read_text()[-3000:]}")


def _send_30mb(port: int) -> tuple[bytes, bytes]:
    line = b"z" * 76 + b"\r\n"
    chunk = line * (MiB // len(line))
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        f = sock.makefile("rb")

        def reply() -> bytes:
            while True:
                got = f.readline()
                if got[3:4] != b"-":
                    return got.rstrip(b"\r\n")

        reply()
        sock.sendall(b"EHLO client.remote.test\r\n")
        reply()
        sock.sendall(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
        assert reply().startswith(b"250") and reply().startswith(b"250") and reply().startswith(b"354")
        sock.sendall(b"From: s@remote.test\r\nTo: alice@example.com\r\nSubject: thirty megabytes\r\n\r\n")
        sent = 0
        while sent < 30 * MiB:
            sock.sendall(chunk)
            sent += len(chunk)
        sock.sendall(b".\r\n")
        over = reply()
        sock.sendall(b"NOOP\r\n")
        return over, reply()


async def test_30mb_message_is_refused_without_buffering_it(tmp_path: Path, nats: Nats, dns_server: DnsServer) -> None:
    mailbox = await start_mesh(tmp_path, nats.url)
    try:
        await mailbox.admin_setup("example.com", ("alice",))
        settings = ingest_settings(mailbox.settings.data_dir, nats.url, mailbox.settings.addr("mailbox"), dns_server,
                                   ingest_port=free_port(), smtp_port=free_port())
        async with ingest_child(tmp_path, settings) as proc:
            # warm up every code path with one ordinary message first
            def ordinary() -> dict[str, tuple[int, bytes]]:
                with smtplib.SMTP("127.0.0.1", settings.smtp_port, timeout=30) as s:
                    return s.sendmail("s@remote.test", ["alice@example.com"], message("warm up"))

            assert await in_thread(ordinary) == {}
            before = _status(proc.pid)
            over, noop = await in_thread(_send_30mb, settings.smtp_port)
            after = _status(proc.pid)
        assert over == b"552 5.3.4 Message too big for system"
        assert noop == b"250 2.0.0 OK"
        growth = after["VmHWM"] - before["VmRSS"]
        print(f"svc_ingest RSS before {before['VmRSS'] / MiB:.1f} MiB, peak after {after['VmHWM'] / MiB:.1f} MiB, "
              f"growth {growth / MiB:.1f} MiB")
        assert growth < 12 * MiB, f"memory grew by {growth / MiB:.1f} MiB while refusing 30 MB"
    finally:
        await stop_mesh(mailbox)


def _nice_of(pid: int, tid: int) -> int:
    # /proc/PID/task/TID/stat: the 19th field is nice; the 2nd, (comm), may hold spaces
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[16])


async def test_ingest_runs_every_thread_at_a_lower_cpu_priority(tmp_path: Path, nats: Nats,
                                                                dns_server: DnsServer) -> None:
    """So that svc_mailbox, on the same machine, delivers accepted mail before more is accepted."""
    mailbox = await start_mesh(tmp_path, nats.url)
    try:
        settings = ingest_settings(mailbox.settings.data_dir, nats.url, mailbox.settings.addr("mailbox"), dns_server,
                                   ingest_nice=7)
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        async with ingest_child(tmp_path, settings) as proc:
            threads = [int(t.name) for t in Path(f"/proc/{proc.pid}/task").iterdir()]
            nices = {_nice_of(proc.pid, t) for t in threads}
        assert len(threads) > 3  # gRPC, telemetry and executor threads too
        assert nices == {min(ours + 7, 19)}
    finally:
        await stop_mesh(mailbox)
