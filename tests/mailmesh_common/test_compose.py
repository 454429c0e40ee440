"""Composition (EmailMessage), byte-level header edits, DSN construction, SMTP dot-stuffing and
the queue's bookkeeping, without any server."""

from __future__ import annotations

import email
import functools
from datetime import UTC, datetime
from email import policy
from pathlib import Path

import pytest
from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import types_pb2

from mailmesh_common.address import MailAddress
from mailmesh_common.errors import ConfigError, InvalidInput
from mailmesh_common.kv import open_database
from mailmesh_common.mime import compose
from svc_send.dsn import build_dsn, status_code
from svc_send.queue import QueueStore, RcptResult, parse_schedule
from svc_send.smtp_client import dot_stuff
from svc_send.store import ts

DATE = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _draft(**kw: object) -> compose.Draft:
    d = compose.Draft(sender=MailAddress("Jörg Müller", "joerg@example.com"), to=[MailAddress("", "a@x.test")])
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def _parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


def test_text_and_html_make_multipart_alternative_with_crlf() -> None:
    c = compose.compose(_draft(text="plain words", html="<p>rich <b>words</b></p>", subject="Grüße"),
                        message_id="m1@example.com", date=DATE)
    assert b"\n" not in c.delivery_raw.replace(b"\r\n", b"")
    m = _parse(c.delivery_raw)
    assert m.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in m.iter_parts()] == ["text/plain", "text/html"]
    assert m["Subject"] == "Grüße" and m["From"].addresses[0].display_name == "Jörg Müller"
    assert m["Message-ID"] == "<m1@example.com>" and m["Date"] == "Wed, 01 May 2024 12:00:00 +0000"
    assert c.delivery_raw.count(b"MIME-Version") == 1


def test_html_only_gets_a_derived_text_part_and_attachments_get_detected_types() -> None:
    c = compose.compose(_draft(html="<p>Hello <i>there</i></p>", attachments=[
        compose.AttachmentIn("photo.JPG", b"\xff\xd8\xff\xe0jpeg"),
        compose.AttachmentIn("data.unknownext", b"\x00\x01"),
        compose.AttachmentIn("C:\\Users\\me\\notes.txt", "ünïcode".encode()),
        compose.AttachmentIn("logo.png", b"\x89PNG", content_id="<logo@x>", inline=True),
        compose.AttachmentIn("scan", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3 pdf bytes"),
        compose.AttachmentIn("README", b"plain words\r\n"),
        compose.AttachmentIn("image.dat99", b"\x89PNG\r\n\x1a\n\x00\x00")]),
        message_id="m2@example.com", date=DATE)
    m = _parse(c.delivery_raw)
    assert m.get_content_type() == "multipart/mixed"
    body = next(m.iter_parts())
    assert body.get_content_type() == "multipart/alternative"
    assert "Hello there" in next(body.iter_parts()).get_content()
    parts = {p.get_filename(): p for p in m.iter_parts() if p.get_filename()}
    assert parts["photo.JPG"].get_content_type() == "image/jpeg"
    assert parts["data.unknownext"].get_content_type() == "application/octet-stream"
    # no extension, or one nobody knows: the content tells
    assert parts["scan"].get_content_type() == "application/pdf"
    assert parts["README"].get_content_type() == "text/plain"
    assert parts["image.dat99"].get_content_type() == "image/png"
    assert parts["notes.txt"].get_content() == "ünïcode"
    assert parts["logo.png"]["Content-ID"] == "<logo@x>" and parts["logo.png"].get_content_disposition() == "inline"


def test_bcc_is_kept_in_the_sent_copy_only() -> None:
    c = compose.compose(_draft(bcc=[MailAddress("Secret", "s@y.test")], cc=[MailAddress("", "c@y.test")]),
                        message_id="m3@example.com", date=DATE)
    assert _parse(c.sent_raw)["Bcc"] == "Secret <s@y.test>"
    assert _parse(c.delivery_raw)["Bcc"] is None and b"s@y.test" not in c.delivery_raw
    assert compose.remove_headers(c.sent_raw, ["bcc"]) == c.delivery_raw


def test_replies_thread_with_in_reply_to_and_references() -> None:
    parent = types_pb2.Message(message_id_header="p@x", references=["root@x", "mid@x"], subject="Re: Plan")
    c = compose.compose(_draft(parent=parent), message_id="m4@example.com", date=DATE)
    m = _parse(c.delivery_raw)
    assert m["In-Reply-To"] == "<p@x>" and m["References"] == "<root@x> <mid@x> <p@x>"
    assert m["Subject"] == "Re: Plan", "no second Re:"
    c = compose.compose(_draft(parent=types_pb2.Message(message_id_header="q@x", subject="Plan")),
                        message_id="m5@example.com", date=DATE)
    assert _parse(c.delivery_raw)["Subject"] == "Re: Plan"


def test_bad_drafts_are_refused() -> None:
    with pytest.raises(InvalidInput, match="line breaks"):
        compose.compose(_draft(subject="a\r\nBcc: x@y"), message_id="m@x", date=DATE)
    with pytest.raises(InvalidInput, match="type/subtype"):
        compose.compose(_draft(attachments=[compose.AttachmentIn("a", b"", mime_type="nonsense")]),
                        message_id="m@x", date=DATE)
    with pytest.raises(InvalidInput):
        compose.mail_address("Eve\r\nBcc: x", "eve@x.test", field_name="to")


def test_header_edits_keep_the_rest_of_the_message_byte_for_byte() -> None:
    raw = (b"From: a@x.test\r\nBcc: one@y.test,\r\n two@y.test\r\nSubject: s\r\nX-Long: a\r\n\tb\r\n\r\n"
           b"Bcc: not a header\r\n.dot\r\n")
    out = compose.remove_headers(raw, ["Bcc"])
    assert out == b"From: a@x.test\r\nSubject: s\r\nX-Long: a\r\n\tb\r\n\r\nBcc: not a header\r\n.dot\r\n"
    assert compose.header_values(raw, "x-long") == ["a b"]
    assert compose.header_values(raw, "bcc") == ["one@y.test, two@y.test"]
    assert compose.normalize_line_ends(b"a\nb\r\nc\n") == b"a\r\nb\r\nc\r\n"


def test_dot_stuffing() -> None:
    assert dot_stuff(b".start\r\nmid\r\n.\r\n..two") == b"..start\r\nmid\r\n..\r\n...two\r\n"


def test_dsn_is_an_rfc3464_report() -> None:
    entry = spb.QueueEntry(id="job-1", mail_from="alice@example.com", domain="x.test", subject="Hi",
                           remote_mta="mx.x.test [192.0.2.1]", create_time=ts(1_700_000_000_000_000))
    failed = [types_pb2.RecipientStatus(email="u@x.test", state=types_pb2.RECIPIENT_STATE_BOUNCED, attempts=3,
                                        last_reply="550 5.7.1 policy rejection", updated_time=ts(1_700_000_100_000_000)),
              types_pb2.RecipientStatus(email="v@x.test", state=types_pb2.RECIPIENT_STATE_BOUNCED, attempts=5,
                                        last_reply="4.4.7 delivery time expired; last reply: 451 4.4.1 refused")]
    original = b"Message-ID: <orig@example.com>\r\nSubject: Hi\r\nFrom: alice@example.com\r\n\r\nbody\r\n"
    raw = build_dsn(entry, failed, original, reporting_mta="mail.example.com")
    m = _parse(raw)
    assert m.get_content_type() == "multipart/report" and m["In-Reply-To"] == "<orig@example.com>"
    assert m["Auto-Submitted"] == "auto-replied" and m["To"] == "alice@example.com"
    text, status, headers = list(m.iter_parts())
    assert "after 3 attempts" in text.get_content() and "after 5 attempts" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    block = raw.decode()
    assert "Reporting-MTA: dns; mail.example.com" in block and "Status: 5.7.1" in block
    assert "Diagnostic-Code: smtp; 550 5.7.1 policy rejection" in block and "Status: 4.4.7" in block
    assert headers.get_content_type() == "text/rfc822-headers" and b"body" not in raw.split(b"rfc822-headers")[1]
    assert status_code("554 no enhanced code") == "5.0.0"


def test_retry_schedule_setting() -> None:
    assert parse_schedule(("0", "300", "1.5")) == (0.0, 300.0, 1.5)
    with pytest.raises(ConfigError):
        parse_schedule(("soon",))


async def test_null_sender_bounces_without_a_dsn_and_schedule_and_expiry_apply(tmp_path: Path) -> None:
    db = open_database(str(tmp_path / "send.db"))
    q = QueueStore(db, (10.0, 60.0), max_age_s=100.0, secret="test")
    t0 = 1_700_000_000_000_000
    for job_id, mail_from in (("null", ""), ("alice", "alice@example.com")):
        entry = spb.QueueEntry(id=job_id, mail_from=mail_from, domain="x.test", state=spb.QUEUE_ENTRY_STATE_QUEUED,
                               status_synced=True, create_time=ts(t0), next_attempt_time=ts(t0),
                               expire_time=ts(t0 + 100_000_000))
        entry.recipients.add(email="u@x.test", state=types_pb2.RECIPIENT_STATE_QUEUED)
        entry.recipients.add(email="v@x.test", state=types_pb2.RECIPIENT_STATE_QUEUED)
        await db.run(functools.partial(QueueStore.create_in, entry=entry))
        claim = await q.claim(job_id, 0, "w1", t0, 30)
        assert claim.kind == "attempt"
        assert (await q.claim(job_id, 0, "w2", t0, 30)).kind == "wait", "leased by w1"
        rec = await q.record(job_id, "w1", [RcptResult("u@x.test", "bounced", "550 5.1.1 no"),
                                            RcptResult("v@x.test", "deferred", "451 4.3.0 later")], t0)
        assert not rec.finished and rec.newly_bounced == ["u@x.test"]
        assert list(rec.entry.bounce_pending) == ([] if not mail_from else ["u@x.test"])
        assert rec.entry.next_attempt_time.seconds == (t0 + 10_000_000) // 1_000_000
        await q.mark_synced(job_id, rec.entry, list(rec.entry.bounce_pending))
        assert (await q.claim(job_id, 0, "w2", t0 + 1_000_000, 30)).kind == "wait"
        assert (await q.claim(job_id, 1, "w2", t0 + 10_000_000, 30)).kind == "attempt", "a newer generation"
        assert (await q.claim(job_id, 0, "w3", t0 + 10_000_000, 30)).kind == "drop", "the older one is dropped"
        rec = await q.record(job_id, "w2", [RcptResult("v@x.test", "deferred", "451 4.3.0 later")],
                             t0 + 100_000_000)
        assert rec.finished and rec.entry.state == spb.QUEUE_ENTRY_STATE_BOUNCED
        assert rec.entry.recipients[1].last_reply.startswith("4.4.7 delivery time expired")
        assert list(rec.entry.bounce_pending) == ([] if not mail_from else ["v@x.test"])
    await db.close()


def test_openssl_rsa_signing_is_byte_identical_to_dkimpys_own() -> None:
    import hashlib

    from dkim.crypto import parse_pem_private_key

    from svc_send import dkim_sign
    from svc_send.dkim_keys import DkimKey, new_private_pem

    key = DkimKey("example.com", "s", "rsa", new_private_pem("rsa"))
    pk = parse_pem_private_key(key.dkimpy_private_key())
    for data in (b"", b"message body hash"):
        digest = hashlib.sha256(data)
        assert dkim_sign._rsa_sign(digest, pk) == bytes(dkim_sign._PURE_PYTHON_RSA_SIGN(digest, pk))
