"""Mail between local users goes through INBOUND like inbound mail: it lands in the recipient's
INBOX, replies join the original's thread on both sides, and Bcc recipients get their copy
without anyone's delivered copy naming them."""

from __future__ import annotations

import email
from email import policy

from mailmesh.v1 import types_pb2

from tests.svc_send.conftest import SendMesh, wait_for


async def _one(sm: SendMesh, user: str, label: str, subject: str) -> types_pb2.Message | None:
    found = [m for m in await sm.label(user, label) if m.subject == subject]
    return found[0] if found else None


async def test_local_delivery_lands_in_inbox_and_replies_join_the_thread(sm: SendMesh) -> None:
    alice, bob, carol = sm.users["alice"], sm.users["bob"], await sm.add_user("carol")
    first = await sm.send_mail(bob, to=("alice@example.com",), bcc=("carol@example.com",), subject="Lunch?",
                               text="Thursday at noon?")
    got = await wait_for(lambda: _one(sm, alice, "INBOX", "Lunch?"), "bob's message in alice's INBOX")
    assert got.unread
    assert [a.email for a in getattr(got, "from")] == ["bob@example.com"]
    carol_copy = await wait_for(lambda: _one(sm, carol, "INBOX", "Lunch?"), "carol's Bcc copy")
    for user, m in ((alice, got), (carol, carol_copy)):
        raw = (await sm.message(user, m.id, types_pb2.MESSAGE_FORMAT_RAW)).raw
        head = raw.split(b"\r\n\r\n", 1)[0]
        assert b"carol@example.com" not in head.replace(b"for <carol@example.com>", b""), "Bcc never shows"
        assert email.message_from_bytes(raw, policy=policy.default)["Bcc"] is None
    states = await sm.states(bob, first.message_id)
    assert states == {"alice@example.com": types_pb2.RECIPIENT_STATE_DELIVERED,
                      "carol@example.com": types_pb2.RECIPIENT_STATE_DELIVERED}

    reply = await sm.send_mail(alice, to=("bob@example.com",), subject="", text="Sounds good",
                               reply_to_message_id=got.id)
    assert reply.thread_id == got.thread_id, "alice's reply joins her thread of bob's message"
    back = await wait_for(lambda: _one(sm, bob, "INBOX", "Re: Lunch?"), "alice's reply in bob's INBOX")
    assert back.thread_id == first.thread_id, "the reply joins bob's thread of his original"
    meta = await sm.message(bob, back.id)
    assert meta.in_reply_to == [(await sm.message(bob, first.message_id)).message_id_header]


async def test_local_copy_carries_the_submission_trace_header(sm: SendMesh) -> None:
    alice, bob = sm.users["alice"], sm.users["bob"]
    r = await sm.send_mail(alice, to=("bob@example.com",), subject="note")
    got = await wait_for(lambda: _one(sm, bob, "INBOX", "note"), "the message in bob's INBOX")
    raw = (await sm.message(bob, got.id, types_pb2.MESSAGE_FORMAT_RAW)).raw
    assert b"Received: by mail.example.com (mailmesh) with HTTP id " in raw
    assert raw.startswith(b"DKIM-Signature:"), "local recipients get the same signed copy"
    assert got.spam_score == 0 and "SPAM" not in got.label_ids
    assert await sm.states(alice, r.message_id) == {"bob@example.com": types_pb2.RECIPIENT_STATE_DELIVERED}
