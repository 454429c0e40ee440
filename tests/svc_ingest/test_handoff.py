"""The durable handoff: blob first, then INBOUND with the ingest id as Nats-Msg-Id and the trace
context in the headers; 250 only after the publish ack, 451 4.3.0 (never 250) when NATS, the
blob store or the mailbox service is down, and no acknowledged message lost when nats-server
is killed in the middle of a stream of sends."""

from __future__ import annotations

import asyncio
import smtplib
import threading
import time
from pathlib import Path

import nats as nats_client
import pytest
from mailmesh.v1 import events_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mailmesh_common import streams, telemetry
from mailmesh_common.blobstore import BlobStore
from mailmesh_common.dns import Resolver
from mailmesh_common.kv import open_database
from svc_ingest.handoff import Handoff
from svc_ingest.pipeline import Envelope, Pipeline
from svc_ingest.spam.filter import SpamFilter
from tests.dnsserver import DnsServer
from tests.svc_ingest.conftest import (
    IngestMesh,
    Nats,
    free_port,
    in_thread,
    ingest_settings,
    message,
    reply_of,
    restart_mailbox,
    start_ingest_mesh,
    stop_ingest_mesh,
)


def send(m: IngestMesh, raw: bytes, rcpts: list[str]) -> dict[str, tuple[int, bytes]]:
    with m.smtp() as s:
        return s.sendmail("sender@remote.test", rcpts, raw)


async def wait_connected(m: IngestMesh, timeout: float = 20, *, mailbox: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while not (m.ctx.nc is not None and m.ctx.nc.is_connected and m.mailbox.nc.is_connected and (
            not mailbox or (m.mailbox.ctx.nc is not None and m.mailbox.ctx.nc.is_connected))):
        assert time.monotonic() < deadline, "services did not reconnect to NATS"
        await asyncio.sleep(0.05)


# --- what is handed off ---------------------------------------------------------------------------

async def test_dmarc_policy_lookup_runs_while_spf_waits_on_dns(tmp_path: Path, nats: Nats,
                                                               dns_server: DnsServer) -> None:
    """With the sender domain's DNS not answering, the DMARC policy lookup is already out while
    SPF's lookup is still being retried (one DNS wait per message, not one per check)."""
    nc = await nats_client.connect(nats.url)
    try:
        settings = ingest_settings(tmp_path, nats.url, "127.0.0.1:1", dns_server)
        pipeline = Pipeline(settings, Resolver(settings.dns_servers, timeout_s=0.3, lifetime_s=1.0),
                            Handoff(BlobStore(tmp_path / "blobs"), nc, nc.jetstream()), hostname="mx.mailmesh.test")
        dns_server.fail("remote.test", "timeout", "TXT")
        dns_server.add("_dmarc.remote.test", "TXT", "v=DMARC1; p=reject")
        env = Envelope(mail_from="sender@remote.test", rcpt_to=["alice@example.com"], client_ip="192.0.2.7",
                       helo="mail.remote.test")
        outcome = await pipeline.authenticate(message("slow dns"), env, "id-1")
        assert outcome.spf.result == "temperror"
        # p=reject, but an aligned SPF temperror is no failure: the sender may try again
        assert (outcome.dmarc.result, outcome.dmarc.disposition) == ("temperror", "none")
        spf_queries = [i for i, q in enumerate(dns_server.queries) if q[:2] == ("remote.test", "TXT")]
        dmarc_first = next(i for i, q in enumerate(dns_server.queries) if q[:2] == ("_dmarc.remote.test", "TXT"))
        assert len(spf_queries) >= 2 and dmarc_first < spf_queries[-1]
    finally:
        await nc.close()


async def test_inbound_message_carries_envelope_auth_spam_blob_and_trace(
        tmp_path: Path, nats: Nats, dns_server: DnsServer, span_exporter: InMemorySpanExporter) -> None:
    """The pipeline against a NATS with no consumer, so the INBOUND message can be read back."""
    nc = await nats_client.connect(nats.url)
    js = nc.jetstream()
    await streams.ensure_streams(js)
    db = open_database(str(tmp_path / "ingest.db"))
    try:
        settings = ingest_settings(tmp_path, nats.url, "127.0.0.1:1", dns_server)
        blobs = BlobStore(tmp_path / "blobs")
        pipeline = Pipeline(settings, Resolver.from_settings(settings), Handoff(blobs, nc, js),
                            spam_filter=SpamFilter(db, threshold=5.0), hostname="mx.mailmesh.test")
        dns_server.add("remote.test", "TXT", "v=spf1 ip4:192.0.2.7 -all")
        raw = message("handed off", to="alice@example.com, bob@example.com")
        env = Envelope(mail_from="sender@remote.test", rcpt_to=["alice@example.com", "bob@example.com"],
                       user_ids=["u1", "u2"], client_ip="192.0.2.7", helo="mail.remote.test")
        with telemetry.tracer().start_as_current_span("smtp.data") as span:
            accepted = await pipeline.process(raw, env)
            trace_id = format(span.get_span_context().trace_id, "032x")
        info = await js.stream_info("INBOUND")
        assert info.state.messages == 1
        stored = await js.get_msg("INBOUND", info.state.last_seq)
        headers = stored.headers or {}
        assert headers["Nats-Msg-Id"] == accepted.ingest_id
        assert headers["traceparent"].split("-")[1] == trace_id
        msg = events_pb2.InboundMessage.FromString(stored.data or b"")
        assert msg.ingest_id == accepted.ingest_id
        assert list(msg.rcpt_to) == ["alice@example.com", "bob@example.com"]
        assert msg.mail_from == "sender@remote.test"
        assert msg.remote_ip == "192.0.2.7" and msg.helo == "mail.remote.test"
        assert msg.source == events_pb2.MESSAGE_SOURCE_SMTP
        assert msg.authentication_results.startswith("mx.mailmesh.test; spf=pass")
        assert msg.HasField("spam") and msg.HasField("received_time")
        assert not msg.quarantine
        blob = await blobs.get(msg.blob_ref)
        assert msg.size == len(blob) and blob.endswith(raw)
        assert f"id {accepted.ingest_id}".encode() in blob
        assert b"\r\nAuthentication-Results: mx.mailmesh.test; spf=pass" in blob
        # the same ingest id again: one blob, and JetStream drops the duplicate
        again = events_pb2.InboundMessage(ingest_id=accepted.ingest_id, rcpt_to=msg.rcpt_to)
        await Handoff(blobs, nc, js).hand_off(blob, again)
        assert (await js.stream_info("INBOUND")).state.messages == 1
    finally:
        await db.close()
        await nc.close()


# --- dependencies down ----------------------------------------------------------------------------

async def test_nats_down_gives_451_and_never_250_then_recovers(ingest_mesh: IngestMesh) -> None:
    m = ingest_mesh
    await in_thread(m.nats.kill)
    with pytest.raises(smtplib.SMTPDataError) as err:
        await in_thread(send, m, message("while nats is down"), ["alice@example.com"])
    code, text = reply_of(err.value)
    assert code == 451 and text.startswith(b"4.3.0 ")
    await in_thread(m.nats.start)
    await wait_connected(m)
    assert await in_thread(send, m, message("after nats is back"), ["alice@example.com"]) == {}
    await m.wait_subject("alice", "after nats is back", timeout=30)


async def inbound_subjects(m: IngestMesh) -> set[str]:
    """Subjects of the messages still waiting in INBOUND (accepted, not yet delivered)."""
    js = m.mailbox.js
    info = await js.stream_info("INBOUND")
    blobs = BlobStore(m.settings.data_dir / "blobs")
    out = set()
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            stored = await js.get_msg("INBOUND", seq)
        except Exception:
            continue  # delivered and removed meanwhile
        msg = events_pb2.InboundMessage.FromString(stored.data or b"")
        raw = await blobs.get(msg.blob_ref)
        for line in raw.split(b"\r\n\r\n")[0].split(b"\r\n"):
            if line.startswith(b"Subject: "):
                out.add(line[9:].decode())
    return out


async def test_killing_nats_during_sends_loses_no_acknowledged_message(ingest_mesh: IngestMesh) -> None:
    m = ingest_mesh
    results: dict[str, int] = {}
    stop = threading.Event()

    def sender() -> None:
        for i in range(60):
            if stop.is_set():
                return
            subject = f"stream {i}"
            try:
                refused = send(m, message(subject), ["alice@example.com"])
                results[subject] = 250 if not refused else 0
            except smtplib.SMTPRecipientsRefused as exc:
                results[subject] = next(iter(exc.recipients.values()))[0]
            except smtplib.SMTPResponseException as exc:
                results[subject] = exc.smtp_code
            except (smtplib.SMTPException, OSError):
                results[subject] = -1
            time.sleep(0.02)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while sum(1 for c in results.values() if c == 250) < 8:
            assert time.monotonic() < deadline, results
            await asyncio.sleep(0.01)
        await in_thread(m.nats.kill)
        while sum(1 for c in results.values() if 400 <= c < 500) < 3:
            assert time.monotonic() < deadline, results
            await asyncio.sleep(0.01)
        await in_thread(m.nats.start)
        await in_thread(thread.join, 60)
    finally:
        stop.set()
    assert set(results.values()) <= {250, 451}, results  # an ack or a temporary failure, nothing else
    assert any(c == 451 for c in results.values())
    accepted = {s for s, c in results.items() if c == 250}
    if m.mailbox_run_task.done():
        # svc_mailbox stopped itself (a background task died while NATS was away): start it
        # again on its data dir and port, as `mailmesh up` restarts a crashed service
        await restart_mailbox(m)
    await wait_connected(m)
    # every acknowledged message is still in INBOUND or already delivered, and gets delivered
    pending = await inbound_subjects(m)
    inbox = await m.wait_for("alice", lambda ms: accepted <= {x.subject for x in ms}, timeout=40)
    assert accepted <= {x.subject for x in inbox}, f"lost: {sorted(accepted - {x.subject for x in inbox})}"
    assert pending <= {x.subject for x in inbox} | (set(results) - accepted)


async def test_blob_store_unavailable_gives_451(ingest_mesh: IngestMesh) -> None:
    m = ingest_mesh
    tmp = m.settings.data_dir / "blobs" / "tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.is_dir():
        tmp.rmdir()
    tmp.write_text("not a directory: every blob write fails")
    try:
        with pytest.raises(smtplib.SMTPDataError) as err:
            await in_thread(send, m, message("no blob store"), ["alice@example.com"])
        code, text = reply_of(err.value)
        assert code == 451 and text.startswith(b"4.3.0 ")
    finally:
        tmp.unlink()
    assert await in_thread(send, m, message("blob store back"), ["alice@example.com"]) == {}
    await m.wait_subject("alice", "blob store back")


async def test_mailbox_unreachable_gives_451_at_rcpt(tmp_path: Path, nats: Nats, dns_server: DnsServer) -> None:
    m = await start_ingest_mesh(tmp_path, nats, dns_server, mailbox_addr=f"127.0.0.1:{free_port()}")
    try:
        def run() -> tuple[int, bytes]:
            with m.smtp() as s:
                s.ehlo()
                s.docmd("MAIL FROM:<s@remote.test>")
                return s.docmd("RCPT TO:<alice@example.com>")

        assert await in_thread(run) == (451, b"4.3.0 Recipient check temporarily unavailable, try again later")
    finally:
        await stop_ingest_mesh(m)


async def test_shutdown_finishes_the_message_in_flight_and_says_421_to_idle_sessions(ingest_mesh: IngestMesh) -> None:
    m = ingest_mesh
    idle = await in_thread(m.smtp)
    await in_thread(idle.ehlo)
    await m.ingest.listener.close(grace_s=5)

    def next_reply() -> tuple[int, bytes]:
        return idle.getreply()

    assert await in_thread(next_reply) == (421, b"4.3.2 Service shutting down, try again later")
    with pytest.raises(OSError):
        await in_thread(m.smtp)  # no longer listening
