"""A recipient in a local domain without that mailbox: through the API the message still goes
to everyone else, the unknown recipient is `bounced` on the SENT copy and the sender gets one
DSN (RFC 3464) naming it; through SMTP submission it is refused at RCPT time (550 5.1.1) and
the accepted recipients get the message without any DSN."""

from __future__ import annotations

import asyncio
import email
import smtplib
import time
from email import policy
from typing import Any

import pytest
from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import types_pb2

from tests.svc_send.conftest import REMOTE, SendMesh, auth_md, wait_for

DELIVERED = types_pb2.RECIPIENT_STATE_DELIVERED
BOUNCED = types_pb2.RECIPIENT_STATE_BOUNCED


async def _dsns(sm: SendMesh, user: str) -> list[types_pb2.Message]:
    return [m for m in await sm.label(user, "INBOX") if m.subject.startswith("Undelivered Mail")]


async def _in_inbox(sm: SendMesh, user: str, subject: str) -> types_pb2.Message | None:
    found = [m for m in await sm.label(user, "INBOX") if m.subject == subject]
    return found[0] if found else None


async def _settled(sm: SendMesh, user: str, msg_id: str) -> dict[str, int] | None:
    states = await sm.states(user, msg_id)
    return states if states and all(s in (DELIVERED, BOUNCED) for s in states.values()) else None


async def test_unknown_local_recipient_bounces_with_a_dsn_and_the_others_get_the_message(sm: SendMesh) -> None:
    alice, bob = sm.users["alice"], sm.users["bob"]
    r = await sm.send_mail(alice, to=("bob@example.com", "nobody@example.com"), cc=(f"dave@{REMOTE}",),
                           subject="Team lunch", text="Friday?")
    assert r.status == spb.SEND_STATUS_QUEUED and r.message_id
    assert await wait_for(lambda: _in_inbox(sm, bob, "Team lunch"), "bob's copy")
    await wait_for(lambda: _settled(sm, alice, r.message_id), "every recipient final")
    assert await sm.states(alice, r.message_id) == {
        "bob@example.com": DELIVERED, "nobody@example.com": BOUNCED, f"dave@{REMOTE}": DELIVERED}
    sent = await sm.message(alice, r.message_id)
    [nobody] = [x for x in sent.recipients if x.email == "nobody@example.com"]
    assert nobody.last_reply.startswith("550 5.1.1") and "no such user" in nobody.last_reply
    assert [sorted(m.rcpts) for m in sm.sink.messages] == [[f"dave@{REMOTE}"]]

    [dsn] = await wait_for(lambda: _dsns(sm, alice), "the DSN in alice's INBOX")
    assert dsn.thread_id == r.thread_id, "the bounce joins the thread of the message it is about"
    assert dsn.unread
    raw = (await sm.message(alice, dsn.id, types_pb2.MESSAGE_FORMAT_RAW)).raw
    report = email.message_from_bytes(raw, policy=policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = list(report.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "text/rfc822-headers"]
    human = parts[0].get_content()
    assert "nobody@example.com" in human and "550 5.1.1" in human
    assert "bob@example.com" not in human and f"dave@{REMOTE}" not in human
    status = raw.split(b"message/delivery-status", 1)[1].decode()
    assert "Final-Recipient: rfc822; nobody@example.com" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.com>: no such user here" in status
    assert "Remote-MTA" not in status, "the failure was ours, not a remote server's"
    assert b"Subject: Team lunch" in raw.split(b"text/rfc822-headers", 1)[1]
    await asyncio.sleep(0.5)  # nothing more arrives later
    assert len(await _dsns(sm, alice)) == 1


async def test_a_message_only_for_unknown_local_recipients_is_bounced_not_refused(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    r = await sm.send_mail(alice, to=("ghost@example.com",), subject="Anyone there?")
    await wait_for(lambda: _settled(sm, alice, r.message_id), "the bounce")
    assert await sm.states(alice, r.message_id) == {"ghost@example.com": BOUNCED}
    [dsn] = await wait_for(lambda: _dsns(sm, alice), "the DSN")
    raw = (await sm.message(alice, dsn.id, types_pb2.MESSAGE_FORMAT_RAW)).raw
    assert b"Final-Recipient: rfc822; ghost@example.com" in raw
    assert [m.id for m in await sm.label(alice, "SENT")] == [r.message_id]
    assert sm.sink.connections == 0


@pytest.mark.send_settings(undo_send_s=1.5)
async def test_an_undone_send_bounces_nothing(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    r = await sm.send_mail(alice, to=("ghost@example.com", "bob@example.com"), subject="never mind")
    assert sm.stub is not None
    await sm.stub.CancelSend(spb.CancelSendRequest(name=f"users/{alice}/messages/{r.message_id}"),
                             metadata=auth_md(alice), timeout=20)
    # past the window (and a scheduler pass or two): still no bounce
    await asyncio.sleep(max(0.0, r.send_time.ToNanoseconds() / 1e9 - time.time()) + 1.5)
    assert await _dsns(sm, alice) == []
    assert (await sm.states(alice, r.message_id))["ghost@example.com"] == types_pb2.RECIPIENT_STATE_QUEUED


async def test_submission_refuses_an_unknown_local_recipient_at_rcpt_and_sends_the_rest(sm: SendMesh) -> None:
    port = sm.send.submission.port
    bob = sm.users["bob"]
    message = (f"From: alice@example.com\r\nTo: bob@example.com, nobody@example.com, dave@{REMOTE}\r\n"
               "Subject: from mutt\r\n\r\nHello.\r\n")

    def submit() -> tuple[Any, ...]:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.ehlo("desktop.example")
            s.login("alice@example.com", "correct horse battery")  # loopback: allowed without TLS in dev
            s.mail("alice@example.com")
            unknown = s.rcpt("nobody@example.com")
            s.rset()
            refused = s.sendmail("alice@example.com", ["bob@example.com", "nobody@example.com", f"dave@{REMOTE}"],
                                 message.encode())
            return unknown, refused

    unknown, refused = await asyncio.to_thread(submit)
    assert unknown == (550, b"5.1.1 No such user")
    assert refused == {"nobody@example.com": (550, b"5.1.1 No such user")}
    assert await wait_for(lambda: _in_inbox(sm, bob, "from mutt"), "bob's copy")
    await wait_for(lambda: _got(sm), "the remote delivery")
    assert sm.sink.messages[0].rcpts == [f"dave@{REMOTE}"]
    [sent] = await sm.label(sm.users["alice"], "SENT")
    assert sorted(await sm.states(sm.users["alice"], sent.id)) == ["bob@example.com", f"dave@{REMOTE}"]
    await asyncio.sleep(0.5)
    assert await _dsns(sm, sm.users["alice"]) == [], "the client was told at RCPT: no bounce as well"


async def _got(sm: SendMesh) -> bool:
    return bool(sm.sink.messages)
