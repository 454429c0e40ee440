"""Virus scanning against a real clamd (Debian's clamav-daemon) loaded with only the test
signature database shipped in tests/svc_ingest/data (the EICAR test file): infected mail is
refused with 554 5.7.1 and logged; clamd unreachable defers with 451 4.7.0 when scanning is
required and passes the mail, logged, when it is optional. Skipped where clamd is not installed."""

from __future__ import annotations

import base64
import logging
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from mailmesh.v1 import ingest_service_pb2 as pb

from svc_ingest.checks.virus import ClamdScanner, ScannerUnavailable, parse_address
from tests.dnsserver import DnsServer
from tests.svc_ingest.conftest import (
    Clamd,
    IngestMesh,
    Nats,
    eicar,
    in_thread,
    message,
    reply_of,
    start_ingest_mesh,
    stop_ingest_mesh,
)


def with_attachment(subject: str, payload: bytes) -> bytes:
    b64 = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (b"From: s@remote.test\r\nTo: alice@example.com\r\nSubject: " + subject.encode() +
            b"\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
            b"--b1\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=test.com\r\n\r\n" + b64 + b"--b1--\r\n")


def send(m: IngestMesh, raw: bytes) -> dict[str, tuple[int, bytes]]:
    with m.smtp() as s:
        return s.sendmail("s@remote.test", ["alice@example.com"], raw)


# --- the client on its own ------------------------------------------------------------------------

async def test_scanner_finds_eicar_inline_and_attached_and_passes_clean_mail(clamd: Clamd) -> None:
    scanner = ClamdScanner(str(clamd.socket), timeout_s=10)
    assert await scanner.ping()
    assert not (await scanner.scan(message("clean"))).infected
    inline = await scanner.scan(message("inline", body=eicar().decode() + "\r\n"))
    assert inline.infected and inline.signature.startswith("Mailmesh.Test.EICAR")
    assert (await scanner.scan(with_attachment("attached", eicar()))).infected


async def test_scanner_unreachable_is_unavailable(tmp_path: Path) -> None:
    scanner = ClamdScanner(str(tmp_path / "no-such.sock"), timeout_s=2)
    assert not await scanner.ping()
    with pytest.raises(ScannerUnavailable):
        await scanner.scan(b"x")


def test_clamd_addresses() -> None:
    assert parse_address("/run/clamav/clamd.ctl") == ("/run/clamav/clamd.ctl", 0)
    assert parse_address("unix:/tmp/c.sock") == ("/tmp/c.sock", 0)
    assert parse_address("127.0.0.1:3310") == ("127.0.0.1", 3310)
    assert parse_address("[::1]:3310") == ("::1", 3310)
    with pytest.raises(ValueError):
        parse_address("clamd")


# --- in the pipeline ------------------------------------------------------------------------------

@pytest.fixture
async def scanning(tmp_path: Path, nats: Nats, dns_server: DnsServer, clamd: Clamd) -> AsyncIterator[IngestMesh]:
    m = await start_ingest_mesh(tmp_path, nats, dns_server, clamd_address=str(clamd.socket), clamd_required=True)
    try:
        yield m
    finally:
        await stop_ingest_mesh(m)


async def test_eicar_over_smtp_is_refused_with_554_and_logged(scanning: IngestMesh,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="svc_ingest.pipeline")
    with pytest.raises(smtplib.SMTPDataError) as err:
        await in_thread(send, scanning, with_attachment("infected", eicar()))
    code, text = reply_of(err.value)
    assert code == 554
    assert text.startswith(b"5.7.1 Message refused: it contains a virus (Mailmesh.Test.EICAR")
    events = [r for r in caplog.records if getattr(r, "event", "") == "virus_refused"]
    assert events and events[0].signature.startswith("Mailmesh.Test.EICAR")  # type: ignore[attr-defined]
    assert await in_thread(send, scanning, message("clean after infected")) == {}
    inbox = await scanning.wait_subject("alice", "clean after infected")
    assert inbox.subject == "clean after infected"
    assert not any(m.subject == "infected" for m in await scanning.messages("alice"))


async def test_eicar_injected_over_grpc_is_refused(scanning: IngestMesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await scanning.stub.InjectMessage(pb.InjectMessageRequest(
            raw=with_attachment("injected infected", eicar()), mail_from="s@remote.test",
            rcpt_to=["alice@example.com"], client_ip="127.0.0.1", helo="client.test"), metadata=scanning.md())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "virus" in (err.value.details() or "")


async def test_clamd_unreachable_and_required_gives_451(tmp_path: Path, nats: Nats, dns_server: DnsServer) -> None:
    m = await start_ingest_mesh(tmp_path, nats, dns_server, clamd_address=str(tmp_path / "gone.sock"),
                                clamd_required=True, clamd_timeout_s=2.0)
    try:
        with pytest.raises(smtplib.SMTPDataError) as err:
            await in_thread(send, m, message("unscannable"))
        assert reply_of(err.value) == (451, b"4.7.0 Virus scanning temporarily unavailable, try again later")
        assert not await m.messages("alice")
    finally:
        await stop_ingest_mesh(m)


async def test_clamd_unreachable_and_optional_passes_with_a_log(tmp_path: Path, nats: Nats, dns_server: DnsServer,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="svc_ingest.pipeline")
    m = await start_ingest_mesh(tmp_path, nats, dns_server, clamd_address=str(tmp_path / "gone.sock"),
                                clamd_required=False, clamd_timeout_s=2.0)
    try:
        assert await in_thread(send, m, message("passed unscanned")) == {}
        await m.wait_subject("alice", "passed unscanned")
        assert any("passed unscanned" in r.getMessage() for r in caplog.records)
    finally:
        await stop_ingest_mesh(m)
