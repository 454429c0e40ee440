"""Delivery to a remote domain through its MX, over real SMTP: DKIM signatures that verify,
STARTTLS, Bcc kept out of the delivered copy, per-recipient states on the SENT message,
retries of temporary failures, bounces (DSN) for permanent ones, null MX, unreachable hosts."""

from __future__ import annotations

import asyncio
import email
import functools
from email import policy

import pytest
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import types_pb2

from mailmesh_common.dns import Resolver
from svc_ingest.checks.dkim import verify_dkim
from tests.svc_send.conftest import REMOTE, SendMesh, setup_remote, wait_for

DELIVERED = types_pb2.RECIPIENT_STATE_DELIVERED
BOUNCED = types_pb2.RECIPIENT_STATE_BOUNCED
DEFERRED = types_pb2.RECIPIENT_STATE_DEFERRED


async def _all_in(sm: SendMesh, user: str, msg_id: str, state: int) -> dict[str, int] | None:
    states = await sm.states(user, msg_id)
    return states if states and all(s == state for s in states.values()) else None


async def _dsns(sm: SendMesh, user: str) -> list[types_pb2.Message]:
    return [m for m in await sm.label(user, "INBOX") if m.subject.startswith("Undelivered Mail")]


async def test_remote_delivery_is_dkim_signed_over_tls_without_bcc(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    r = await sm.send_mail(alice, to=(f"dave@{REMOTE}", f"erin@{REMOTE}"), bcc=(f"frank@{REMOTE}",),
                           subject="Quarterly numbers", text="see attached",
                           attachments=[spb.OutgoingAttachment(filename="q3.pdf", data=b"%PDF-1.4 fake")])
    assert r.status == spb.SEND_STATUS_QUEUED and r.message_id and r.thread_id
    await wait_for(lambda: _all_in(sm, alice, r.message_id, DELIVERED), "every recipient DELIVERED")
    assert len(sm.sink.messages) == 1, "one transaction for the three recipients of one domain"
    got = sm.sink.messages[0]
    assert got.mail_from == "alice@example.com"
    assert sorted(got.rcpts) == [f"dave@{REMOTE}", f"erin@{REMOTE}", f"frank@{REMOTE}"]
    assert got.tls, "opportunistic STARTTLS was offered and used"
    results = await verify_dkim(Resolver([sm.dns.address]), got.data)
    assert {(x.algorithm, x.result) for x in results} == {("rsa-sha256", "pass"), ("ed25519-sha256", "pass")}
    assert all(x.domain == "example.com" for x in results)
    parsed = email.message_from_bytes(got.data, policy=policy.default)
    assert parsed["Bcc"] is None and b"frank@" not in got.data.split(b"\r\n\r\n")[0]
    assert parsed["From"] == "Alice <alice@example.com>"
    assert parsed["Message-ID"].endswith("@example.com>")
    assert parsed.get_content_type() == "multipart/mixed"
    [pdf] = [p for p in parsed.iter_attachments()]
    assert pdf.get_content_type() == "application/pdf" and pdf.get_filename() == "q3.pdf"
    # the SENT copy keeps Bcc (the sender's own record), and shows the delivery
    sent = await sm.message(alice, r.message_id)
    assert "SENT" in sent.label_ids and not sent.unread
    assert [a.email for a in sent.bcc] == [f"frank@{REMOTE}"]
    assert all(x.attempts == 1 and x.last_reply.startswith("250") for x in sent.recipients)


async def test_connections_are_reused_and_domains_get_one_job_each(sm: SendMesh) -> None:
    setup_remote(sm.dns, "other.test")
    alice = sm.users["alice"]
    first = await sm.send_mail(alice, to=(f"dave@{REMOTE}", "olga@other.test"))
    await wait_for(lambda: _all_in(sm, alice, first.message_id, DELIVERED), "first message delivered")
    second = await sm.send_mail(alice, to=(f"dave@{REMOTE}",))
    await wait_for(lambda: _all_in(sm, alice, second.message_id, DELIVERED), "second message delivered")
    assert len(sm.sink.messages) == 3  # remote.test twice, other.test once (same sink)
    assert sm.sink.connections <= 2, "the connection to 127.0.0.1 is reused"


async def test_two_temporary_failures_then_delivery(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    sm.sink.data_replies = ["451 4.3.0 try again later", "421 4.7.0 greylisted, come back soon"]
    r = await sm.send_mail(alice, to=(f"dave@{REMOTE}",))
    await wait_for(lambda: _all_in(sm, alice, r.message_id, DELIVERED), "delivery after two retries")
    sent = await sm.message(alice, r.message_id)
    assert sent.recipients[0].attempts == 3 and sent.recipients[0].last_reply.startswith("250")
    assert len(sm.sink.messages) == 1 and sm.sink.transactions == 3
    assert await _dsns(sm, alice) == []


async def test_permanent_failure_bounces_with_exactly_one_dsn(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    sm.sink.rcpt_replies[f"nobody@{REMOTE}"] = ["550 5.1.1 <nobody@remote.test>: no such user here"]
    r = await sm.send_mail(alice, to=(f"nobody@{REMOTE}", f"dave@{REMOTE}"), subject="Plans")
    await wait_for(lambda: _settled(sm, alice, r.message_id), "both recipients final")
    states = await sm.states(alice, r.message_id)
    assert states == {f"nobody@{REMOTE}": BOUNCED, f"dave@{REMOTE}": DELIVERED}
    [dsn] = await wait_for(lambda: _dsns(sm, alice), "the DSN in alice's INBOX")
    assert dsn.thread_id == r.thread_id, "the bounce joins the thread of the message it is about"
    raw = (await sm.message(alice, dsn.id, types_pb2.MESSAGE_FORMAT_RAW)).raw
    report = email.message_from_bytes(raw, policy=policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = list(report.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    human = parts[0].get_content()
    assert f"nobody@{REMOTE}" in human and "550 5.1.1" in human and "after 1 attempt" in human
    assert f"dave@{REMOTE}" not in human
    status = raw.split(b"message/delivery-status", 1)[1].decode()
    assert f"Final-Recipient: rfc822; nobody@{REMOTE}" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 <nobody@remote.test>: no such user here" in status
    assert f"Remote-MTA: dns; mx.{REMOTE}" in status and "X-Mailmesh-Attempts: 1" in status
    assert b"Subject: Plans" in raw.split(b"text/rfc822-headers", 1)[1]
    # nothing more arrives later
    await asyncio.sleep(0.5)
    assert len(await _dsns(sm, alice)) == 1


async def _settled(sm: SendMesh, user: str, msg_id: str) -> bool:
    states = await sm.states(user, msg_id)
    return bool(states) and all(s in (DELIVERED, BOUNCED) for s in states.values())


async def test_null_mx_bounces_at_once_without_connecting(sm: SendMesh) -> None:
    sm.dns.add("nomail.test", "MX", (0, "."))
    alice = sm.users["alice"]
    r = await sm.send_mail(alice, to=("x@nomail.test",))
    await wait_for(lambda: _all_in(sm, alice, r.message_id, BOUNCED), "the bounce")
    sent = await sm.message(alice, r.message_id)
    assert sent.recipients[0].last_reply.startswith("556 5.1.10") and sent.recipients[0].attempts == 1
    [dsn] = await wait_for(lambda: _dsns(sm, alice), "the DSN")
    raw = (await sm.message(alice, dsn.id, types_pb2.MESSAGE_FORMAT_RAW)).raw
    assert b"Status: 5.1.10" in raw and b"null MX" in raw
    assert sm.sink.connections == 0


@pytest.mark.send_settings(outbound_max_age_s=3.0, outbound_retry_schedule_s="0.3")
async def test_unreachable_host_is_deferred_then_expires_with_a_dsn(sm: SendMesh) -> None:
    setup_remote(sm.dns, "down.test", "127.0.0.2")  # nothing listens there: connection refused
    alice = sm.users["alice"]
    r = await sm.send_mail(alice, to=("x@down.test",))
    first = await wait_for(lambda: _deferred(sm, alice, r.message_id), "a deferral (or the expiry)")
    if first.recipients[0].state == DEFERRED:
        assert "4.4.1" in first.recipients[0].last_reply and "127.0.0.2" in first.recipients[0].last_reply
    await wait_for(lambda: _all_in(sm, alice, r.message_id, BOUNCED), "expiry", timeout=20)
    sent = await sm.message(alice, r.message_id)
    reply = sent.recipients[0].last_reply
    assert reply.startswith("4.4.7 delivery time expired; last reply: 451 4.4.1") and "127.0.0.2" in reply
    assert sent.recipients[0].attempts >= 2, "retried until it expired"
    [dsn] = await wait_for(lambda: _dsns(sm, alice), "the DSN")
    raw = (await sm.message(alice, dsn.id, types_pb2.MESSAGE_FORMAT_RAW)).raw
    assert b"Status: 4.4.7" in raw and b"x@down.test" in raw


async def _deferred(sm: SendMesh, user: str, msg_id: str) -> types_pb2.Message | None:
    m = await sm.message(user, msg_id)
    return m if m.recipients and m.recipients[0].state in (DEFERRED, BOUNCED) else None


async def test_delivery_state_is_visible_through_the_mailbox_api(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    r = await sm.send_mail(alice, to=(f"dave@{REMOTE}",))
    await wait_for(lambda: _all_in(sm, alice, r.message_id, DELIVERED), "delivery")
    listed = await sm.mb.ListMessages(mpb.ListMessagesRequest(parent="users/me", label_id="SENT"),
                                      metadata=sm.md(alice))
    assert [m.id for m in listed.messages] == [r.message_id]


async def test_mx_hosts_are_tried_by_preference_and_implicit_mx_is_the_domain(sm: SendMesh) -> None:
    sm.dns.add("backup.test", "MX", (10, "primary.backup.test"))
    sm.dns.add("backup.test", "MX", (20, "secondary.backup.test"))
    sm.dns.add("primary.backup.test", "A", "127.0.0.2")  # refuses connections
    sm.dns.add("secondary.backup.test", "A", "127.0.0.1")
    sm.dns.add("plain.test", "A", "127.0.0.1")  # no MX at all: RFC 5321 5.1 implicit MX
    alice = sm.users["alice"]
    r = await sm.send_mail(alice, to=("a@backup.test", "b@plain.test"))
    await wait_for(lambda: _all_in(sm, alice, r.message_id, DELIVERED), "both domains delivered")
    assert sorted(x for m in sm.sink.messages for x in m.rcpts) == ["a@backup.test", "b@plain.test"]
    queries = [(name, rtype) for name, rtype, _ in sm.dns.queries]
    assert queries.index(("primary.backup.test", "A")) < queries.index(("secondary.backup.test", "A"))
    sent = await sm.message(alice, r.message_id)
    assert all(x.attempts == 1 for x in sent.recipients)


@pytest.mark.send_settings(outbound_per_destination=1)
async def test_one_destination_gets_at_most_its_connection_limit(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    sm.sink.data_delay = 0.2
    sent = [await sm.send_mail(alice, to=(f"u{i}@{REMOTE}",), subject=f"m{i}") for i in range(4)]
    for r in sent:
        await wait_for(functools.partial(_all_in, sm, alice, r.message_id, DELIVERED), "every message delivered")
    assert len(sm.sink.messages) == 4
    assert sm.sink.max_active == 1 and sm.sink.connections == 1, "one connection, reused, one at a time"


async def test_a_pooled_connection_the_remote_closed_is_replaced_without_a_deferral(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    first = await sm.send_mail(alice, to=(f"dave@{REMOTE}",), subject="one")
    await wait_for(lambda: _all_in(sm, alice, first.message_id, DELIVERED), "the first delivery")
    await wait_for(lambda: _idle_pooled(sm), "the connection back in the pool")
    assert sm.sink.drop_connections() == 1  # the remote MX closes the idle connection
    second = await sm.send_mail(alice, to=(f"erin@{REMOTE}",), subject="two")
    await wait_for(lambda: _all_in(sm, alice, second.message_id, DELIVERED), "the second delivery")
    [r] = (await sm.message(alice, second.message_id)).recipients
    assert r.attempts == 1 and r.last_reply.startswith("250"), "no deferral: a fresh connection was made at once"
    assert sm.sink.connections == 2 and len(sm.sink.messages) == 2


async def _idle_pooled(sm: SendMesh) -> bool:
    return any(sm.send.delivery.pool._idle.values())
