"""Ingest parses each message once: the spam filter's parse travels in InboundMessage as a
ParsedSummary, and svc_mailbox builds the record from it instead of parsing the blob again.
The record must read exactly as the mailbox's own parse of the stored message would."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mailmesh_common import mime
from svc_ingest.pipeline import parsed_summary
from tests.svc_ingest.conftest import IngestMesh, in_thread

RAW = (
    b"From: =?utf-8?q?J=C3=BCrgen_Sender?= <Juergen@Remote.TEST>\r\n"
    b"Sender: list-bounces@remote.test\r\n"
    b"To: Alice <alice@example.com>, bob@elsewhere.test\r\n"
    b"Cc: \"Team, The\" <team@remote.test>\r\n"
    b"Reply-To: replies@remote.test\r\n"
    b"Subject: =?utf-8?b?UsOpc3Vtw6k=?= of the week\r\n"
    b"Message-ID: <summary-e2e@remote.test>\r\n"
    b"In-Reply-To: <parent@remote.test>\r\n"
    b"References: <root@remote.test> <parent@remote.test>\r\n"
    b"Date: Tue, 24 Nov 2026 08:30:00 +0100\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=XYZ\r\n"
    b"\r\n"
    b"--XYZ\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe weekly summary, as promised.\r\n"
    b"--XYZ\r\nContent-Type: application/pdf; name=report.pdf\r\nContent-Disposition: attachment\r\n"
    b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--XYZ--\r\n")


def send(m: IngestMesh, raw: bytes) -> dict[str, tuple[int, bytes]]:
    with m.smtp() as s:
        return s.sendmail("sender@remote.test", ["alice@example.com"], raw)


async def test_record_from_the_ingest_parse_matches_the_mailbox_parse(
        ingest_mesh: IngestMesh, span_exporter: InMemorySpanExporter) -> None:
    m = ingest_mesh
    assert await in_thread(send, m, RAW) == {}
    got = await m.wait_for("alice", lambda ms: any(x.message_id_header == "summary-e2e@remote.test" for x in ms))
    rec = next(x for x in got if x.message_id_header == "summary-e2e@remote.test")
    own = mime.parse_message(await m.raw("alice", rec.id))  # what the mailbox would have parsed
    assert rec.subject == own.subject == "Résumé of the week"
    assert [(a.name, a.email) for a in getattr(rec, "from")] == [(a.name, a.email) for a in own.from_]
    assert [a.email for a in rec.to] == [a.email for a in own.to] == ["alice@example.com", "bob@elsewhere.test"]
    assert [(a.name, a.email) for a in rec.cc] == [("Team, The", "team@remote.test")]
    assert [a.email for a in rec.reply_to] == ["replies@remote.test"]
    assert rec.snippet == own.snippet and rec.snippet.startswith("The weekly summary")
    assert rec.has_attachments and own.has_attachments
    assert rec.date.ToDatetime().isoformat() == "2026-11-24T07:30:00"
    assert list(rec.references) == own.references and list(rec.in_reply_to) == own.in_reply_to
    assert list(rec.parse_warnings) == own.parse_warnings
    delivered = [s for s in span_exporter.get_finished_spans()
                 if s.name == "inbound.consume" and (s.attributes or {}).get("mailmesh.ingest_id")]
    assert delivered and all((s.attributes or {}).get("mailmesh.parsed_at_ingest") for s in delivered), \
        "the mailbox used ingest's summary instead of parsing the blob"


def test_summary_is_left_out_when_the_parse_cut_a_body_short() -> None:
    long_body = ("word " * 120_000).encode()
    parsed = mime.parse_message(b"Subject: long\r\n\r\n" + long_body, max_body_chars=100_000)
    assert parsed_summary(parsed) is None  # the mailbox's own parse (1,000,000 chars) decides
    short = mime.parse_message(b"Subject: short\r\nFrom: a@b.test\r\n\r\nhello\r\n", max_body_chars=100_000)
    s = parsed_summary(short)
    assert s is not None and s.subject == "short" and s.snippet == "hello"
    assert [a.email for a in getattr(s, "from")] == ["a@b.test"]
