"""Messages over real gRPC: append, read in every format, attachments, listing and paging,
isolation between users, batch modify with exact counters, trash, delete and blob references.

Most tests share one mesh per module (each makes its own domain and users); the helpers at the
top are used by the other mailbox test modules too."""

from __future__ import annotations

import asyncio
import base64
import os
import random
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import types_pb2

from mailmesh_common.blobstore import BlobStore
from svc_mailbox import messages
from tests.svc_mailbox.conftest import Mesh, fresh_users, start_mesh, stop_mesh

pytestmark = pytest.mark.asyncio(loop_scope="module")

F = types_pb2
BASE_TS = 1_750_000_000


# --- helpers (also used by test_labels, test_uids, test_concurrency) -------------------------------

def raw_message(subject: str = "Hello", body: str = "Hi there.", *, frm: str = "Carol <carol@remote.test>",
                to: str = "alice@example.com", msgid: str | None = None, extra: str = "") -> bytes:
    mid = msgid or f"{os.urandom(8).hex()}@remote.test"
    return (f"From: {frm}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{mid}>\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n{extra}\r\n{body}\r\n").encode()


def ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


async def append(mesh: Mesh, user: str, raw: bytes | None = None, *, labels: Sequence[str] = ("INBOX",),
                 unread: bool = True, starred: bool = False, keywords: Sequence[str] = (),
                 when: int | None = None, key: str = "", subject: str = "Hello") -> types_pb2.Message:
    req = pb.AppendMessageRequest(parent="users/me", raw=raw or raw_message(subject), label_ids=list(labels),
                                  unread=unread, starred=starred, keywords=list(keywords), idempotency_key=key)
    if when is not None:
        req.internal_date.CopyFrom(ts(when))
    r = await mesh.stub.AppendMessage(req, metadata=mesh.md(user))
    return r.message


async def expect(code: grpc.StatusCode, call: Awaitable[Any], match: str | None = None) -> grpc.aio.AioRpcError:
    """Awaits a call that must fail with `code` (and a message containing `match`)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = info.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    assert err.details(), "an error must say what is wrong"
    if match is not None:
        assert match.lower() in (err.details() or "").lower(), err.details()
    return err


async def get_label(mesh: Mesh, user: str, label_id: str) -> types_pb2.Label:
    return (await mesh.stub.GetLabel(pb.GetLabelRequest(name=f"users/me/labels/{label_id}"),
                                     metadata=mesh.md(user))).label


async def get_message(mesh: Mesh, user: str, msg_id: str,
                      fmt: int = F.MESSAGE_FORMAT_METADATA) -> types_pb2.Message:
    return (await mesh.stub.GetMessage(pb.GetMessageRequest(name=f"users/me/messages/{msg_id}", format=fmt),
                                       metadata=mesh.md(user))).message


async def modify(mesh: Mesh, user: str, ids: Sequence[str], **kw: Any) -> pb.BatchModifyMessagesResponse:
    return await mesh.stub.BatchModifyMessages(pb.BatchModifyMessagesRequest(parent="users/me", ids=list(ids), **kw),
                                               metadata=mesh.md(user))


async def walk_messages(mesh: Mesh, user: str, label_id: str = "", *, page_size: int = 500,
                        unread_only: bool = False, starred_only: bool = False) -> list[types_pb2.Message]:
    """Every message of a listing, following page tokens (asserting no page repeats an id)."""
    out: list[types_pb2.Message] = []
    token = ""
    for _ in range(10_000):
        r = await mesh.stub.ListMessages(pb.ListMessagesRequest(
            parent="users/me", label_id=label_id, page_size=page_size, page_token=token, unread_only=unread_only,
            starred_only=starred_only, format=F.MESSAGE_FORMAT_MINIMAL), metadata=mesh.md(user))
        assert len(r.messages) <= page_size
        out.extend(r.messages)
        token = r.next_page_token
        if not token:
            break
    ids = [m.id for m in out]
    assert len(ids) == len(set(ids)), "a message was listed twice"
    return out


async def walk_threads(mesh: Mesh, user: str, label_id: str = "", *, page_size: int = 500,
                       unread_only: bool = False, starred_only: bool = False) -> list[types_pb2.Thread]:
    out: list[types_pb2.Thread] = []
    token = ""
    for _ in range(10_000):
        r = await mesh.stub.ListThreads(pb.ListThreadsRequest(
            parent="users/me", label_id=label_id, page_size=page_size, page_token=token, unread_only=unread_only,
            starred_only=starred_only), metadata=mesh.md(user))
        out.extend(r.threads)
        token = r.next_page_token
        if not token:
            break
    ids = [t.id for t in out]
    assert len(ids) == len(set(ids)), "a thread was listed twice"
    return out


async def walk_uids(mesh: Mesh, user: str, label_id: str, *, page_size: int = 10_000,
                    changed_since: int = 0) -> list[pb.UidEntry]:
    out: list[pb.UidEntry] = []
    uid_min = 1
    for _ in range(10_000):
        r = await mesh.stub.ListLabelUids(pb.ListLabelUidsRequest(
            name=f"users/me/labels/{label_id}", uid_min=uid_min, page_size=page_size, changed_since=changed_since),
            metadata=mesh.md(user))
        out.extend(r.entries)
        if not r.has_more:
            break
        assert r.entries, "has_more without entries: a client could not make progress"
        uid_min = r.entries[-1].uid + 1
    return out


async def assert_counts_exact(mesh: Mesh, user: str) -> dict[str, types_pb2.Label]:
    """Every label's counters equal a recount through the listings, UID maps and thread lists."""
    labels = (await mesh.stub.ListLabels(pb.ListLabelsRequest(parent="users/me"), metadata=mesh.md(user))).labels
    everything = await walk_messages(mesh, user, "ALL")
    by_label: dict[str, list[types_pb2.Message]] = {}
    for lb in labels:
        msgs = everything if lb.id == "ALL" else await walk_messages(mesh, user, lb.id)
        by_label[lb.id] = msgs
        unread = await walk_messages(mesh, user, lb.id, unread_only=True)
        starred = await walk_messages(mesh, user, lb.id, starred_only=True)
        uids = await walk_uids(mesh, user, lb.id)
        threads = await walk_threads(mesh, user, lb.id)
        where = f"label {lb.id} of user {user}"
        assert lb.messages_total == len(msgs), where
        assert lb.messages_unread == len(unread) == sum(m.unread for m in msgs), where
        assert len(starred) == sum(m.starred for m in msgs), where
        assert sorted(e.message_id for e in uids) == sorted(m.id for m in msgs), where
        assert all(e.uid < lb.uid_next for e in uids), where
        assert lb.threads_total == len(threads) == len({m.thread_id for m in msgs}), where
        for m in msgs:
            if lb.id == "ALL":
                assert "SPAM" not in m.label_ids and "TRASH" not in m.label_ids
            else:
                assert lb.id in m.label_ids, where
            assert m.uids[lb.id] in {e.uid for e in uids}
    acct = (await mesh.stub.GetAccount(pb.GetAccountRequest(name="users/me"), metadata=mesh.md(user))).account
    spam_trash = {m.id for m in by_label["SPAM"]} | {m.id for m in by_label["TRASH"]}
    assert acct.messages_total == len(everything) + len(spam_trash - {m.id for m in everything})
    return {lb.id: lb for lb in labels}


def multipart_message(attachment: bytes, *, filename: str = "data.bin") -> bytes:
    b64 = base64.encodebytes(attachment).decode().replace("\n", "\r\n")
    return ("From: Dave <dave@remote.test>\r\nTo: Alice <alice@example.com>, bob@example.com\r\n"
            "Cc: Erin <erin@remote.test>\r\nSubject: Report\r\nMessage-ID: <report-1@remote.test>\r\n"
            "Date: Tue, 24 Nov 2026 09:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="outer"\r\n\r\n'
            "--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n"
            "--inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe plain report body.\r\n"
            "--inner\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>The <b>HTML</b> report body.</p>\r\n"
            "--inner--\r\n"
            f"--outer\r\nContent-Type: application/octet-stream\r\n"
            f'Content-Disposition: attachment; filename="{filename}"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
            f"{b64}--outer--\r\n").encode()


# --- append ---------------------------------------------------------------------------------------

async def test_append_sent_drafts_and_imap_append(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    work = (await mesh.stub.CreateLabel(pb.CreateLabelRequest(parent="users/me", name="Work"),
                                        metadata=mesh.md(alice))).label
    sent = await append(mesh, alice, labels=["SENT"], unread=False, keywords=["$Forwarded"], when=BASE_TS)
    draft = await append(mesh, alice, labels=["drafts"], unread=False, keywords=["\\Draft"], when=BASE_TS + 1)
    imap = await append(mesh, alice, labels=[work.id], unread=True, starred=True, keywords=["$label1", "\\Answered"],
                        when=BASE_TS + 2)
    assert sent.label_ids == ["SENT"] and not sent.unread and list(sent.keywords) == ["$Forwarded"]
    assert sent.internal_date.seconds == BASE_TS
    assert draft.label_ids == ["DRAFTS"] and list(draft.keywords) == ["\\Draft"]
    assert set(imap.label_ids) == {work.id, "STARRED"} and imap.starred and imap.unread
    assert sorted(imap.keywords) == ["$label1", "\\Answered"]
    assert set(imap.uids) == {work.id, "STARRED", "ALL"} and all(imap.uids.values())
    assert sent.uids["SENT"] == 1 and draft.uids["DRAFTS"] == 1 and imap.uids[work.id] == 1
    assert [sent.uids["ALL"], draft.uids["ALL"], imap.uids["ALL"]] == [1, 2, 3]
    got = await get_message(mesh, alice, imap.id)
    assert got.internal_date.seconds == BASE_TS + 2 and got.subject == "Hello"
    labels = await assert_counts_exact(mesh, alice)
    assert (labels["SENT"].messages_total, labels["SENT"].messages_unread) == (1, 0)
    assert (labels[work.id].messages_total, labels[work.id].messages_unread) == (1, 1)
    assert (labels["ALL"].messages_total, labels["ALL"].messages_unread) == (3, 1)
    assert labels["STARRED"].messages_total == 1 and labels["INBOX"].messages_total == 0


async def test_append_idempotency_key_returns_the_first_message(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    first = await append(mesh, alice, raw_message("one"), labels=["SENT"], key="send-42")
    again = await append(mesh, alice, raw_message("one"), labels=["SENT"], key="send-42")
    other = await append(mesh, alice, raw_message("one"), labels=["SENT"], key="send-43")
    assert again.id == first.id and other.id != first.id
    assert (await get_label(mesh, alice, "SENT")).messages_total == 2
    acct = (await mesh.stub.GetAccount(pb.GetAccountRequest(name="users/me"), metadata=mesh.md(alice))).account
    assert acct.messages_total == 2
    await expect(grpc.StatusCode.INVALID_ARGUMENT, append(mesh, alice, key="k" * 201), "idempotency_key")


async def test_append_rejects_bad_requests(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    await expect(grpc.StatusCode.NOT_FOUND, append(mesh, alice, labels=["Label_999"]), "Label_999")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, append(mesh, alice, labels=["UNREAD"]), "UNREAD")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, append(mesh, alice, labels=["ALL"]))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.AppendMessage(
        pb.AppendMessageRequest(parent="users/me", raw=b"", label_ids=["INBOX"]), metadata=mesh.md(alice)), "raw")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, append(mesh, alice, keywords=["\\Seen"]), "unread")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, append(mesh, alice, keywords=["bad keyword"]), "keyword")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.AppendMessage(pb.AppendMessageRequest(
        parent="users/me", raw=raw_message(), track_recipients=["not an address"]), metadata=mesh.md(alice)),
        "track_recipients")
    for seconds, nanos in ((10**12, 0), (-(10**12), 0), (0, -1), (0, 10**9)):
        req = pb.AppendMessageRequest(parent="users/me", raw=raw_message(), internal_date=Timestamp(
            seconds=seconds, nanos=nanos))
        await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.AppendMessage(req, metadata=mesh.md(alice)),
                     "internal_date")
    old = await append(mesh, alice, when=-2_000_000_000, labels=["SENT"])  # 1906 is fine
    assert old.internal_date.seconds == -2_000_000_000
    dup = await append(mesh, alice, keywords=["$a", "$A", "\\draft"], labels=["DRAFTS"])
    assert list(dup.keywords) == ["$a", "\\Draft"]
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.AppendMessage(
        pb.AppendMessageRequest(parent="users/nobody/x", raw=b"x"), metadata=mesh.md(alice)), "parent")
    await expect(grpc.StatusCode.NOT_FOUND, mesh.stub.AppendMessage(
        pb.AppendMessageRequest(parent="users/nobody", raw=raw_message()), metadata=mesh.md()), "user")
    # nothing was stored by the failed calls
    assert (await get_label(mesh, alice, "ALL")).messages_total == 2


async def test_append_over_quota_is_resource_exhausted(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    domain = "quota.test"
    await mesh.stub.CreateDomain(pb.CreateDomainRequest(name=domain), metadata=mesh.md())
    acct = (await mesh.stub.CreateAccount(pb.CreateAccountRequest(
        email=f"small@{domain}", password="long enough pw", quota_bytes=3000), metadata=mesh.md())).account
    user = acct.user_id
    assert acct.quota_bytes == 3000
    big = raw_message("big", "x" * 1200)
    big2 = raw_message("big2", "y" * 1200)
    await append(mesh, user, big)
    await append(mesh, user, big2)
    err = await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, append(mesh, user, raw_message("big3", "z" * 1200)),
                       "quota")
    assert "3000" in (err.details() or "")
    got = (await mesh.stub.GetAccount(pb.GetAccountRequest(name="users/me"), metadata=mesh.md(user))).account
    assert got.messages_total == 2 and got.used_bytes == len(big) + len(big2)
    res = await mesh.stub.ResolveRecipient(pb.ResolveRecipientRequest(address=f"small@{domain}", message_size=2000),
                                           metadata=mesh.md())
    assert res.resolution == pb.RECIPIENT_RESOLUTION_OVER_QUOTA and res.user_id == user
    # deleting frees the space
    ids = [m.id for m in await walk_messages(mesh, user)]
    await mesh.stub.DeleteMessage(pb.DeleteMessageRequest(name=f"users/me/messages/{ids[0]}"), metadata=mesh.md(user))
    await append(mesh, user, raw_message("big3", "z" * 1200))


@pytest.mark.asyncio(loop_scope="function")
async def test_append_too_big(tmp_path: Path, nats_url: str) -> None:
    mesh = await start_mesh(tmp_path, nats_url, max_message_bytes=10_000)
    try:
        alice = (await mesh.admin_setup(users=("alice",)))["alice"]
        await append(mesh, alice, raw_message("fits", "a" * 9000))
        await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, append(mesh, alice, raw_message("big", "a" * 10_000)),
                     "10000")
        assert (await get_label(mesh, alice, "INBOX")).messages_total == 1
    finally:
        await stop_mesh(mesh)


# --- reading --------------------------------------------------------------------------------------

async def test_get_message_formats(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    raw = multipart_message(b"\x00\x01binary\xff" * 10, filename="report.bin")
    m = await append(mesh, alice, raw, when=BASE_TS)

    minimal = await get_message(mesh, alice, m.id, F.MESSAGE_FORMAT_MINIMAL)
    assert minimal.id == m.id and minimal.thread_id == m.thread_id and list(minimal.label_ids) == ["INBOX"]
    assert minimal.unread and minimal.size_estimate == len(raw) and minimal.internal_date.seconds == BASE_TS
    assert minimal.snippet.startswith("The plain report body")
    assert not minimal.subject and not minimal.to and not minimal.raw and not minimal.text_body

    meta = await get_message(mesh, alice, m.id, F.MESSAGE_FORMAT_METADATA)
    assert meta.subject == "Report" and meta.message_id_header == "report-1@remote.test"
    assert [(a.name, a.email) for a in getattr(meta, "from")] == [("Dave", "dave@remote.test")]
    assert [a.email for a in meta.to] == ["alice@example.com", "bob@example.com"]
    assert [a.email for a in meta.cc] == ["erin@remote.test"]
    assert meta.has_attachments and meta.date.seconds > 0
    assert not meta.text_body and not meta.html_body and not meta.attachments and not meta.raw
    default = await get_message(mesh, alice, m.id, F.MESSAGE_FORMAT_UNSPECIFIED)
    assert default == meta

    full = await get_message(mesh, alice, m.id, F.MESSAGE_FORMAT_FULL)
    assert full.subject == "Report"
    assert "The plain report body." in full.text_body
    assert "<b>HTML</b>" in full.html_body
    assert [(a.filename, a.mime_type, a.size) for a in full.attachments] == [
        ("report.bin", "application/octet-stream", 90)]
    assert not full.raw

    rawf = await get_message(mesh, alice, m.id, F.MESSAGE_FORMAT_RAW)
    assert rawf.raw == raw and rawf.id == m.id and not rawf.subject and not rawf.text_body

    await expect(grpc.StatusCode.NOT_FOUND, get_message(mesh, alice, "0000000000000000"), "not found")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, get_message(mesh, alice, m.id, 99), "format")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, get_message(mesh, alice, "x" * 65))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.GetMessage(
        pb.GetMessageRequest(name=f"users/me/threads/{m.id}"), metadata=mesh.md(alice)), "name")


async def test_get_attachment_streams_multi_chunk(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    data = random.Random(7).randbytes(200_000)
    m = await append(mesh, alice, multipart_message(data))
    full = await get_message(mesh, alice, m.id, F.MESSAGE_FORMAT_FULL)
    (att,) = full.attachments
    assert att.size == len(data) and att.filename == "data.bin"
    chunks = [c async for c in mesh.stub.GetAttachment(
        pb.GetAttachmentRequest(message=f"users/me/messages/{m.id}", attachment_id=att.attachment_id),
        metadata=mesh.md(alice))]
    assert len(chunks) >= 3
    assert chunks[0].HasField("attachment") and not any(c.HasField("attachment") for c in chunks[1:])
    assert chunks[0].attachment.filename == "data.bin" and chunks[0].attachment.size == len(data)
    assert chunks[0].attachment.attachment_id == att.attachment_id
    assert b"".join(c.data for c in chunks) == data

    async def fetch(msg: str, att_id: str) -> None:
        async for _ in mesh.stub.GetAttachment(pb.GetAttachmentRequest(
                message=f"users/me/messages/{msg}", attachment_id=att_id), metadata=mesh.md(alice)):
            pass

    await expect(grpc.StatusCode.NOT_FOUND, fetch(m.id, "9"), "9")
    await expect(grpc.StatusCode.NOT_FOUND, fetch(m.id, "../etc"))
    await expect(grpc.StatusCode.NOT_FOUND, fetch("0000000000000000", att.attachment_id))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, fetch(m.id, ""), "attachment_id")


async def test_malformed_messages_are_kept_with_warnings(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    samples = [
        b"\x00\xff\xfe garbage without any headers \x80\x81",
        (b"From: x\r\nSubject: =?utf-8?B?broken?=\r\nContent-Type: multipart/mixed; boundary=nope\r\n\r\n"
         b"--other\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n"),
        b"Subject: no body separator\r\nContent-Type: text/plain; charset=unknown-charset-x\r\n\xe9\xe8",
    ]
    for raw in samples:
        m = await append(mesh, alice, raw)
        got = await get_message(mesh, alice, m.id, F.MESSAGE_FORMAT_RAW)
        assert got.raw == raw
        assert got.parse_warnings, raw
        await get_message(mesh, alice, m.id, F.MESSAGE_FORMAT_FULL)  # never an error
    assert (await get_label(mesh, alice, "INBOX")).messages_total == len(samples)


# --- listing --------------------------------------------------------------------------------------

async def test_list_messages_pages_through_1000_without_gaps(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    order = list(range(1000))
    random.Random(1).shuffle(order)  # appended out of order: the list is by internal date
    ids: dict[int, str] = {}

    async def one(i: int) -> None:
        m = await append(mesh, alice, raw_message(f"m{i}", f"body {i}"), when=BASE_TS + i * 60, unread=i % 3 == 0)
        ids[i] = m.id

    for start in range(0, 1000, 100):
        await asyncio.gather(*(one(i) for i in order[start:start + 100]))
    newest_first = [ids[i] for i in range(999, -1, -1)]

    for size in (37, 500):
        listed = await walk_messages(mesh, alice, "INBOX", page_size=size)
        assert [m.id for m in listed] == newest_first
    first = await mesh.stub.ListMessages(pb.ListMessagesRequest(parent="users/me", label_id="INBOX", page_size=37),
                                         metadata=mesh.md(alice))
    assert len(first.messages) == 37 and first.result_size_estimate == 1000 and first.next_page_token
    assert first.messages[0].subject == "m999"  # METADATA by default
    clamped = await mesh.stub.ListMessages(pb.ListMessagesRequest(parent="users/me", page_size=100_000),
                                           metadata=mesh.md(alice))
    assert len(clamped.messages) == 500 and clamped.result_size_estimate == 1000
    default = await mesh.stub.ListMessages(pb.ListMessagesRequest(parent="users/me"), metadata=mesh.md(alice))
    assert len(default.messages) == 50
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.ListMessages(
        pb.ListMessagesRequest(parent="users/me", page_size=-1), metadata=mesh.md(alice)), "page_size")
    unread = await walk_messages(mesh, alice, "INBOX", page_size=45, unread_only=True)
    assert [m.id for m in unread] == [ids[i] for i in range(999, -1, -1) if i % 3 == 0]
    r = await mesh.stub.ListMessages(pb.ListMessagesRequest(parent="users/me", label_id="INBOX", unread_only=True),
                                     metadata=mesh.md(alice))
    assert r.result_size_estimate == 334
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.ListMessages(
        pb.ListMessagesRequest(parent="users/me", format=F.MESSAGE_FORMAT_RAW), metadata=mesh.md(alice)), "format")

    # the largest batch in one call: every message read, then starred
    r = await modify(mesh, alice, newest_first, unread=False)
    assert len(r.messages) == 1000 and not any(m.unread for m in r.messages)
    await modify(mesh, alice, newest_first, starred=True)
    inbox = await get_label(mesh, alice, "INBOX")
    assert (inbox.messages_total, inbox.messages_unread, inbox.threads_total) == (1000, 0, 1000)
    assert (await get_label(mesh, alice, "STARRED")).messages_total == 1000
    assert [m.id for m in await walk_messages(mesh, alice, "INBOX", starred_only=True)] == newest_first
    assert await walk_messages(mesh, alice, "INBOX", unread_only=True) == []


async def test_list_filters_and_all_mail(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    a = await append(mesh, alice, when=BASE_TS + 1, unread=True)                     # inbox, unread
    b = await append(mesh, alice, when=BASE_TS + 2, unread=False, starred=True)       # inbox, starred
    c = await append(mesh, alice, when=BASE_TS + 3, unread=True, starred=True)        # inbox, both
    d = await append(mesh, alice, labels=[], when=BASE_TS + 4, unread=True)          # archived
    s = await append(mesh, alice, labels=["SPAM"], when=BASE_TS + 5, unread=True)    # spam
    t = await append(mesh, alice, labels=["TRASH"], when=BASE_TS + 6, unread=True)   # trash
    sent = await append(mesh, alice, labels=["SENT"], when=BASE_TS + 7, unread=False)

    async def ids(label: str = "", **kw: bool) -> list[str]:
        return [m.id for m in await walk_messages(mesh, alice, label, page_size=2, **kw)]

    async def estimate(label: str = "", **kw: bool) -> int:
        r = await mesh.stub.ListMessages(pb.ListMessagesRequest(parent="users/me", label_id=label, **kw),
                                         metadata=mesh.md(alice))
        return r.result_size_estimate

    assert await ids() == [sent.id, d.id, c.id, b.id, a.id]
    assert await ids("ALL") == await ids()
    assert await ids("INBOX") == [c.id, b.id, a.id]
    assert await ids("inbox") == [c.id, b.id, a.id]
    assert await ids("INBOX", unread_only=True) == [c.id, a.id]
    assert await ids("INBOX", starred_only=True) == [c.id, b.id]
    assert await ids("INBOX", unread_only=True, starred_only=True) == [c.id]
    assert await ids(unread_only=True) == [d.id, c.id, a.id]
    assert await ids("SPAM") == [s.id] and await ids("TRASH") == [t.id]
    assert await ids("STARRED") == [c.id, b.id]
    assert await estimate() == 5 and await estimate(unread_only=True) == 3
    assert await estimate("INBOX", starred_only=True) == 2
    assert await estimate("INBOX", unread_only=True) == 2
    assert await estimate("SPAM") == 1
    await expect(grpc.StatusCode.NOT_FOUND, ids("Label_77"), "Label_77")


async def test_page_tokens_are_bound_to_user_and_listing(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    u = await fresh_users(mesh)
    alice, bob = u["alice"], u["bob"]
    for i in range(5):
        await append(mesh, alice, when=BASE_TS + i)
        await append(mesh, bob, when=BASE_TS + i)

    async def page(user: str, token: str, **kw: Any) -> pb.ListMessagesResponse:
        req = pb.ListMessagesRequest(parent="users/me", page_size=2, page_token=token, **kw)
        return await mesh.stub.ListMessages(req, metadata=mesh.md(user))

    token = (await page(alice, "", label_id="INBOX")).next_page_token
    assert token
    assert len((await page(alice, token, label_id="INBOX")).messages) == 2
    assert len((await page(alice, token, label_id="inbox")).messages) == 2  # the same listing
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for bad in (tampered, "garbage", "x" * 2000, token + "AAAA", "%%%"):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, page(alice, bad, label_id="INBOX"), "page_token")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, page(bob, token, label_id="INBOX"), "page_token")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, page(alice, token, label_id="INBOX", unread_only=True),
                 "page_token")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, page(alice, token, label_id="SENT"), "page_token")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.ListThreads(
        pb.ListThreadsRequest(parent="users/me", label_id="INBOX", page_token=token), metadata=mesh.md(alice)),
        "page_token")


async def test_list_threads_newest_activity_first(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    t1 = await append(mesh, alice, raw_message("Plans", msgid="p1@x"), when=BASE_TS + 1, unread=False)
    t2 = await append(mesh, alice, raw_message("Other", msgid="o1@x"), when=BASE_TS + 2, unread=False)
    r1 = await append(mesh, alice, raw_message("Re: Plans", msgid="p2@x", extra="In-Reply-To: <p1@x>\r\n"),
                      when=BASE_TS + 3, unread=True)
    t3 = await append(mesh, alice, raw_message("Third", msgid="t1@x"), when=BASE_TS + 4, unread=False)
    assert r1.thread_id == t1.thread_id
    threads = await walk_threads(mesh, alice, "INBOX", page_size=1)
    assert [t.id for t in threads] == [t3.thread_id, t1.thread_id, t2.thread_id]
    plans = threads[1]
    assert plans.message_count == 2 and plans.unread and plans.subject == "Plans"
    # with message summaries, oldest first, without bodies
    assert [m.id for m in plans.messages] == [t1.id, r1.id]
    assert [m.subject for m in plans.messages] == ["Plans", "Re: Plans"] and not plans.messages[0].text_body
    unread = await walk_threads(mesh, alice, "INBOX", unread_only=True)
    assert [t.id for t in unread] == [t1.thread_id]
    r = await mesh.stub.ListThreads(pb.ListThreadsRequest(parent="users/me", label_id="INBOX", unread_only=True),
                                    metadata=mesh.md(alice))
    assert r.result_size_estimate == 1
    r = await mesh.stub.ListThreads(pb.ListThreadsRequest(parent="users/me", label_id="INBOX"),
                                    metadata=mesh.md(alice))
    assert r.result_size_estimate == 3
    await modify(mesh, alice, [r1.id], unread=False)
    assert await walk_threads(mesh, alice, "INBOX", unread_only=True) == []
    await modify(mesh, alice, [t2.id], starred=True)
    starred = await walk_threads(mesh, alice, "INBOX", starred_only=True)
    assert [t.id for t in starred] == [t2.thread_id]
    r = await mesh.stub.ListThreads(pb.ListThreadsRequest(parent="users/me", label_id="INBOX", starred_only=True),
                                    metadata=mesh.md(alice))
    assert r.result_size_estimate == 1
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.ListThreads(
        pb.ListThreadsRequest(parent="users/me", page_size=-5), metadata=mesh.md(alice)), "page_size")
    await assert_counts_exact(mesh, alice)


# --- isolation ------------------------------------------------------------------------------------

async def test_users_cannot_reach_each_other(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    u = await fresh_users(mesh)
    alice, bob = u["alice"], u["bob"]
    label = (await mesh.stub.CreateLabel(pb.CreateLabelRequest(parent="users/me", name="Private"),
                                         metadata=mesh.md(alice))).label
    m = await append(mesh, alice, multipart_message(b"secret" * 10), labels=["INBOX", label.id])
    att = (await get_message(mesh, alice, m.id, F.MESSAGE_FORMAT_FULL)).attachments[0].attachment_id
    s = mesh.stub
    md = mesh.md(bob)
    A = f"users/{alice}"
    alice_email = (await s.GetAccount(pb.GetAccountRequest(name="users/me"), metadata=mesh.md(alice))).account.email
    denied = grpc.StatusCode.PERMISSION_DENIED

    async def stream_all(call: Any) -> None:
        async for _ in call:
            break

    for call in (
        s.GetAccount(pb.GetAccountRequest(name=A), metadata=md),
        s.SetPassword(pb.SetPasswordRequest(name=A, password="hijacked pw"), metadata=md),
        s.AppendMessage(pb.AppendMessageRequest(parent=A, raw=raw_message()), metadata=md),
        s.ListLabels(pb.ListLabelsRequest(parent=A), metadata=md),
        s.GetLabel(pb.GetLabelRequest(name=f"{A}/labels/{label.id}"), metadata=md),
        s.CreateLabel(pb.CreateLabelRequest(parent=A, name="x"), metadata=md),
        s.UpdateLabel(pb.UpdateLabelRequest(name=f"{A}/labels/{label.id}", label=types_pb2.Label(name="y")),
                      metadata=md),
        s.DeleteLabel(pb.DeleteLabelRequest(name=f"{A}/labels/{label.id}"), metadata=md),
        s.ListMessages(pb.ListMessagesRequest(parent=A), metadata=md),
        s.ListThreads(pb.ListThreadsRequest(parent=A), metadata=md),
        s.GetMessage(pb.GetMessageRequest(name=f"{A}/messages/{m.id}"), metadata=md),
        stream_all(s.GetAttachment(pb.GetAttachmentRequest(message=f"{A}/messages/{m.id}", attachment_id=att),
                                   metadata=md)),
        s.GetThread(pb.GetThreadRequest(name=f"{A}/threads/{m.thread_id}"), metadata=md),
        s.BatchModifyMessages(pb.BatchModifyMessagesRequest(parent=A, ids=[m.id], unread=False), metadata=md),
        s.TrashMessage(pb.TrashMessageRequest(name=f"{A}/messages/{m.id}"), metadata=md),
        s.UntrashMessage(pb.UntrashMessageRequest(name=f"{A}/messages/{m.id}"), metadata=md),
        s.DeleteMessage(pb.DeleteMessageRequest(name=f"{A}/messages/{m.id}"), metadata=md),
        s.EmptyLabel(pb.EmptyLabelRequest(name=f"{A}/labels/TRASH"), metadata=md),
        s.ListChanges(pb.ListChangesRequest(parent=A), metadata=md),
        stream_all(s.WatchChanges(pb.WatchChangesRequest(parent=A), metadata=md)),
        s.ListLabelUids(pb.ListLabelUidsRequest(name=f"{A}/labels/INBOX"), metadata=md),
        s.GetAccount(pb.GetAccountRequest(email=alice_email), metadata=md),
    ):
        await expect(denied, call)

    # alice's ids asked for in bob's own mailbox: simply not there
    me = "users/me"
    nf = grpc.StatusCode.NOT_FOUND
    await expect(nf, s.GetMessage(pb.GetMessageRequest(name=f"{me}/messages/{m.id}"), metadata=md))
    await expect(nf, stream_all(s.GetAttachment(pb.GetAttachmentRequest(
        message=f"{me}/messages/{m.id}", attachment_id=att), metadata=md)))
    await expect(nf, s.GetThread(pb.GetThreadRequest(name=f"{me}/threads/{m.thread_id}"), metadata=md))
    await expect(nf, s.GetLabel(pb.GetLabelRequest(name=f"{me}/labels/{label.id}"), metadata=md))
    await expect(nf, s.BatchModifyMessages(pb.BatchModifyMessagesRequest(parent=me, ids=[m.id], unread=False),
                                           metadata=md))
    await expect(nf, s.BatchModifyMessages(pb.BatchModifyMessagesRequest(parent=me, ids=[m.id],
                                                                         add_label_ids=[label.id]), metadata=md))
    await expect(nf, s.TrashMessage(pb.TrashMessageRequest(name=f"{me}/messages/{m.id}"), metadata=md))
    await expect(nf, s.UntrashMessage(pb.UntrashMessageRequest(name=f"{me}/messages/{m.id}"), metadata=md))
    await expect(nf, s.DeleteMessage(pb.DeleteMessageRequest(name=f"{me}/messages/{m.id}"), metadata=md))
    await expect(nf, s.ListMessages(pb.ListMessagesRequest(parent=me, label_id=label.id), metadata=md))
    await expect(nf, s.ListLabelUids(pb.ListLabelUidsRequest(name=f"{me}/labels/{label.id}"), metadata=md))
    await expect(nf, s.DeleteLabel(pb.DeleteLabelRequest(name=f"{me}/labels/{label.id}"), metadata=md))
    await expect(nf, s.UpdateLabel(pb.UpdateLabelRequest(name=f"{me}/labels/{label.id}",
                                                         label=types_pb2.Label(name="z")), metadata=md))
    bob_changes = await s.ListChanges(pb.ListChangesRequest(parent=me), metadata=md)
    assert all(ch.user_id == bob for ch in bob_changes.changes)
    assert not any(ch.message_id == m.id for ch in bob_changes.changes)
    # alice's mailbox is untouched
    still = await get_message(mesh, alice, m.id)
    assert still.unread and set(still.label_ids) == {"INBOX", label.id}
    assert (await get_label(mesh, alice, label.id)).name == "Private"
    assert (await get_label(mesh, bob, "INBOX")).messages_total == 0


# --- modifying ------------------------------------------------------------------------------------

async def test_batch_modify_labels_flags_keywords_keep_counters_exact(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    work = (await mesh.stub.CreateLabel(pb.CreateLabelRequest(parent="users/me", name="Work"),
                                        metadata=mesh.md(alice))).label
    msgs = [await append(mesh, alice, when=BASE_TS + i, subject=f"s{i}") for i in range(6)]
    ids = [m.id for m in msgs]
    await assert_counts_exact(mesh, alice)

    r = await modify(mesh, alice, ids[:4], add_label_ids=[work.id], remove_label_ids=["INBOX"])
    assert [m.id for m in r.messages] == ids[:4] and not r.modified_ids
    assert all(list(m.label_ids) == [work.id] for m in r.messages)
    labels = await assert_counts_exact(mesh, alice)
    assert (labels["INBOX"].messages_total, labels[work.id].messages_total) == (2, 4)
    assert labels[work.id].messages_unread == 4

    await modify(mesh, alice, ids[:2], unread=False)
    await modify(mesh, alice, ids[2:3], remove_label_ids=["UNREAD"])
    labels = await assert_counts_exact(mesh, alice)
    assert labels[work.id].messages_unread == 1 and labels["ALL"].messages_unread == 3
    await modify(mesh, alice, ids[:1], add_label_ids=["unread"])
    assert (await assert_counts_exact(mesh, alice))[work.id].messages_unread == 2

    r = await modify(mesh, alice, ids[:2], starred=True)
    assert all(m.starred and "STARRED" in m.label_ids for m in r.messages)
    r = await modify(mesh, alice, ids[2:3], add_label_ids=["STARRED"])
    assert r.messages[0].starred
    labels = await assert_counts_exact(mesh, alice)
    assert labels["STARRED"].messages_total == 3
    r = await modify(mesh, alice, ids[:1], remove_label_ids=["starred"])
    assert not r.messages[0].starred and "STARRED" not in r.messages[0].label_ids
    r = await modify(mesh, alice, ids[1:2], starred=False)
    assert not r.messages[0].starred
    assert (await assert_counts_exact(mesh, alice))["STARRED"].messages_total == 1

    r = await modify(mesh, alice, ids[:3], add_keywords=["$Important", "\\Answered"])
    assert all(sorted(m.keywords) == ["$Important", "\\Answered"] for m in r.messages)
    r = await modify(mesh, alice, ids[:3], remove_keywords=["$Important"])
    assert all(list(m.keywords) == ["\\Answered"] for m in r.messages)
    before = (await get_label(mesh, alice, work.id)).highest_modseq
    r = await modify(mesh, alice, ids[:3], remove_keywords=["$Important"])  # no-op: no new modseq
    assert (await get_label(mesh, alice, work.id)).highest_modseq == before
    await expect(grpc.StatusCode.INVALID_ARGUMENT, modify(mesh, alice, ids[:1], add_keywords=["\\Seen"]), "unread")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, modify(mesh, alice, ids[:1], add_keywords=["\\flagged"]),
                 "starred")
    for bad in ("a b", "", "x" * 101, "\\Recent", "\\Custom", "a]b", "caf\u00e9", "tab\t"):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, modify(mesh, alice, ids[:1], add_keywords=[bad]), "keyword")
    # keywords are case-insensitive; system flags take their canonical spelling
    r = await modify(mesh, alice, ids[:1], add_keywords=["$important", "\\answered", "\\DRAFT", "$New"])
    assert list(r.messages[0].keywords) == ["$New", "$important", "\\Answered", "\\Draft"]
    r = await modify(mesh, alice, ids[:1], remove_keywords=["$NEW", "\\draft", "$IMPORTANT"])
    assert list(r.messages[0].keywords) == ["\\Answered"]
    await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, modify(
        mesh, alice, ids[:1], add_keywords=[f"$k{i}" for i in range(64)]), "64")

    # moving to SPAM / TRASH through labels leaves All Mail
    await modify(mesh, alice, ids[5:6], add_label_ids=["SPAM"], remove_label_ids=["INBOX"])
    labels = await assert_counts_exact(mesh, alice)
    assert labels["SPAM"].messages_total == 1 and labels["ALL"].messages_total == 5
    r = await modify(mesh, alice, ids[4:5], add_label_ids=["TRASH"])
    assert list(r.messages[0].label_ids) == ["TRASH"]
    labels = await assert_counts_exact(mesh, alice)
    assert labels["TRASH"].messages_total == 1 and labels["ALL"].messages_total == 4
    r = await modify(mesh, alice, ids[4:5], remove_label_ids=["TRASH"])
    assert "TRASH" not in r.messages[0].label_ids
    await assert_counts_exact(mesh, alice)


async def test_batch_modify_unchanged_since(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    a = await append(mesh, alice, subject="a")
    b = await append(mesh, alice, subject="b")
    since = max(a.history_id, b.history_id)
    await modify(mesh, alice, [a.id], add_keywords=["$x"])  # a changes after `since`
    r = await modify(mesh, alice, [a.id, b.id], unread=False, unchanged_since=since)
    assert list(r.modified_ids) == [a.id]
    got = {m.id: m for m in r.messages}
    assert got[a.id].unread and not got[b.id].unread
    assert (await get_message(mesh, alice, a.id)).unread
    assert not (await get_message(mesh, alice, b.id)).unread
    await assert_counts_exact(mesh, alice)


async def test_batch_modify_rejections(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    m = await append(mesh, alice)
    err = await expect(grpc.StatusCode.RESOURCE_EXHAUSTED, modify(mesh, alice, [m.id] * 1001, unread=False), "1000")
    assert err
    await expect(grpc.StatusCode.NOT_FOUND, modify(mesh, alice, [m.id], add_label_ids=["Label_404"]), "Label_404")
    await expect(grpc.StatusCode.NOT_FOUND, modify(mesh, alice, [m.id], remove_label_ids=["Label_404"]))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, modify(mesh, alice, [], unread=False), "ids")
    await expect(grpc.StatusCode.INVALID_ARGUMENT,
                 modify(mesh, alice, [m.id], add_label_ids=["INBOX"], remove_label_ids=["inbox"]))
    await expect(grpc.StatusCode.INVALID_ARGUMENT, modify(mesh, alice, [m.id], add_label_ids=["ALL"]))
    await expect(grpc.StatusCode.INVALID_ARGUMENT,
                 modify(mesh, alice, [m.id], add_label_ids=["STARRED"], starred=False))
    await expect(grpc.StatusCode.INVALID_ARGUMENT,
                 modify(mesh, alice, [m.id], add_label_ids=["UNREAD"], remove_label_ids=["UNREAD"]))
    # a batch naming an unknown message changes nothing
    await expect(grpc.StatusCode.NOT_FOUND, modify(mesh, alice, [m.id, "ffffffffffffffff"], unread=False),
                 "ffffffffffffffff")
    assert (await get_message(mesh, alice, m.id)).unread


async def test_trash_untrash_restores_labels(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    work = (await mesh.stub.CreateLabel(pb.CreateLabelRequest(parent="users/me", name="Work"),
                                        metadata=mesh.md(alice))).label
    m = await append(mesh, alice, labels=["INBOX", work.id], starred=True)
    archived = await append(mesh, alice, labels=[], subject="archived")

    async def trash(mid: str) -> types_pb2.Message:
        return (await mesh.stub.TrashMessage(pb.TrashMessageRequest(name=f"users/me/messages/{mid}"),
                                             metadata=mesh.md(alice))).message

    async def untrash(mid: str) -> types_pb2.Message:
        return (await mesh.stub.UntrashMessage(pb.UntrashMessageRequest(name=f"users/me/messages/{mid}"),
                                               metadata=mesh.md(alice))).message

    t = await trash(m.id)
    assert set(t.label_ids) == {"TRASH", "STARRED"} and t.starred
    labels = await assert_counts_exact(mesh, alice)
    assert labels["INBOX"].messages_total == 0 and labels[work.id].messages_total == 0
    assert labels["TRASH"].messages_total == 1 and labels["ALL"].messages_total == 1
    assert (await trash(m.id)).label_ids == t.label_ids  # idempotent
    u = await untrash(m.id)
    assert set(u.label_ids) == {"INBOX", work.id, "STARRED"} and not u.trashed_from_label_ids
    assert u.uids["INBOX"] > m.uids["INBOX"]  # back in the folder with a new UID
    labels = await assert_counts_exact(mesh, alice)
    assert labels["INBOX"].messages_total == 1 and labels["TRASH"].messages_total == 0
    assert (await untrash(m.id)).label_ids == u.label_ids  # idempotent

    await trash(archived.id)
    assert list((await untrash(archived.id)).label_ids) == []  # back to All Mail only, like before
    await assert_counts_exact(mesh, alice)
    # a label deleted while the message was in TRASH is not restored
    await trash(m.id)
    await mesh.stub.DeleteLabel(pb.DeleteLabelRequest(name=f"users/me/labels/{work.id}"), metadata=mesh.md(alice))
    assert set((await untrash(m.id)).label_ids) == {"INBOX", "STARRED"}
    await assert_counts_exact(mesh, alice)


async def test_delete_forever_and_blob_references(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    u = await fresh_users(mesh)
    alice, bob = u["alice"], u["bob"]
    blobs = BlobStore(mesh.settings.data_dir / "blobs")
    raw = raw_message("shared", f"unique {os.urandom(8).hex()}")
    ref = await blobs.put(raw)
    copies = {}
    for name, user in (("alice", alice), ("bob", bob)):
        r = await mesh.stub.DeliverMessage(pb.DeliverMessageRequest(
            parent=f"users/{user}", ingest_id=f"ing-{ref[:8]}", blob_ref=ref), metadata=mesh.md())
        copies[name] = r.message
        assert r.message.blob_ref == ref
    # one message of alice's own, whose blob nobody else references
    own_raw = raw_message("own", f"unique {os.urandom(8).hex()}")
    own = await append(mesh, alice, own_raw)
    own_path = blobs.path(own.blob_ref)
    assert own_path.exists()

    await mesh.stub.DeleteMessage(pb.DeleteMessageRequest(name=f"users/me/messages/{own.id}"),
                                  metadata=mesh.md(alice))
    await expect(grpc.StatusCode.NOT_FOUND, get_message(mesh, alice, own.id))
    await expect(grpc.StatusCode.NOT_FOUND, mesh.stub.DeleteMessage(
        pb.DeleteMessageRequest(name=f"users/me/messages/{own.id}"), metadata=mesh.md(alice)))
    mailbox = mesh.ctx.components["mailbox"]
    await mailbox.collect_blobs(grace_s=3600)
    assert own_path.exists(), "an unreferenced blob is kept for the grace period"
    await mailbox.collect_blobs(grace_s=0)
    assert not own_path.exists()

    await mesh.stub.DeleteMessage(pb.DeleteMessageRequest(name=f"users/me/messages/{copies['alice'].id}"),
                                  metadata=mesh.md(alice))
    await mailbox.collect_blobs(grace_s=0)
    assert blobs.path(ref).exists(), "bob's copy still references the blob"
    got = await get_message(mesh, bob, copies["bob"].id, F.MESSAGE_FORMAT_RAW)
    assert got.raw == raw
    await mesh.stub.DeleteMessage(pb.DeleteMessageRequest(name=f"users/me/messages/{copies['bob'].id}"),
                                  metadata=mesh.md(bob))
    await mailbox.collect_blobs(grace_s=0)
    assert not blobs.path(ref).exists()
    acct = (await mesh.stub.GetAccount(pb.GetAccountRequest(name="users/me"), metadata=mesh.md(alice))).account
    assert acct.messages_total == 0 and acct.used_bytes == 0
    await assert_counts_exact(mesh, alice)
    await assert_counts_exact(mesh, bob)


async def test_empty_trash(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    keep = await append(mesh, alice, subject="keep")
    gone = [await append(mesh, alice, subject=f"gone {i}", when=BASE_TS + i) for i in range(5)]
    for m in gone:
        await mesh.stub.TrashMessage(pb.TrashMessageRequest(name=f"users/me/messages/{m.id}"),
                                     metadata=mesh.md(alice))
    r = await mesh.stub.EmptyLabel(pb.EmptyLabelRequest(name="users/me/labels/TRASH"), metadata=mesh.md(alice))
    assert r.deleted_count == 5
    for m in gone:
        await expect(grpc.StatusCode.NOT_FOUND, get_message(mesh, alice, m.id))
    labels = await assert_counts_exact(mesh, alice)
    assert labels["TRASH"].messages_total == 0 and labels["INBOX"].messages_total == 1
    assert (await get_message(mesh, alice, keep.id)).id == keep.id
    r = await mesh.stub.EmptyLabel(pb.EmptyLabelRequest(name="users/me/labels/trash"), metadata=mesh.md(alice))
    assert r.deleted_count == 0
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.EmptyLabel(
        pb.EmptyLabelRequest(name="users/me/labels/INBOX"), metadata=mesh.md(alice)), "TRASH")


async def test_batch_modify_a_long_thread(shared_mesh: Mesh) -> None:
    """A thread of hundreds of messages: one batch over all of them stays fast and exact."""
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    n = 300
    first = await append(mesh, alice, raw_message("Long thread", msgid="long0@x"), when=BASE_TS)
    msgs = [first]
    for start in range(1, n, 100):
        msgs += await asyncio.gather(*(append(
            mesh, alice, raw_message("Re: Long thread", msgid=f"long{i}@x", extra="In-Reply-To: <long0@x>\r\n"),
            when=BASE_TS + i, unread=i % 2 == 0) for i in range(start, min(n, start + 100))))
    assert {m.thread_id for m in msgs} == {first.thread_id}
    ids = [m.id for m in msgs]
    r = await modify(mesh, alice, ids, unread=False, add_label_ids=["IMPORTANT"])
    assert len(r.messages) == n
    threads = await walk_threads(mesh, alice, "IMPORTANT")
    assert [(t.id, t.message_count, t.unread) for t in threads] == [(first.thread_id, n, False)]
    # a list shows the newest messages of a long thread, not all of them
    assert [m.id for m in threads[0].messages] == ids[-messages.LIST_THREAD_MESSAGES:]
    await modify(mesh, alice, ids[-1:], unread=True)
    assert [t.id for t in await walk_threads(mesh, alice, "INBOX", unread_only=True)] == [first.thread_id]
    await modify(mesh, alice, ids[:150], remove_label_ids=["INBOX"])
    labels = await assert_counts_exact(mesh, alice)
    assert (labels["INBOX"].messages_total, labels["INBOX"].threads_total) == (150, 1)
    assert labels["IMPORTANT"].messages_total == n


async def test_delivery_status_of_sent_mail(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    req = pb.AppendMessageRequest(parent="users/me", raw=raw_message("out"), label_ids=["SENT"],
                                  track_recipients=["x@remote.test", "y@remote.test"])
    sent = (await mesh.stub.AppendMessage(req, metadata=mesh.md(alice))).message
    assert [(r.email, r.state) for r in sent.recipients] == [("x@remote.test", types_pb2.RECIPIENT_STATE_QUEUED),
                                                             ("y@remote.test", types_pb2.RECIPIENT_STATE_QUEUED)]
    up = types_pb2.RecipientStatus(email="X@remote.test", state=types_pb2.RECIPIENT_STATE_DELIVERED,
                                   last_reply="250 ok", attempts=1)
    r = await mesh.stub.UpdateDeliveryStatus(pb.UpdateDeliveryStatusRequest(
        name=f"users/{alice}/messages/{sent.id}", recipients=[up]), metadata=mesh.md())
    assert [r.state for r in r.message.recipients] == [types_pb2.RECIPIENT_STATE_DELIVERED,
                                                       types_pb2.RECIPIENT_STATE_QUEUED]
    got = await get_message(mesh, alice, sent.id)
    assert got.recipients[0].last_reply == "250 ok" and got.history_id > sent.history_id
    # IMAP: the folder's HIGHESTMODSEQ covers the message's new MODSEQ
    assert (await get_label(mesh, alice, "SENT")).highest_modseq >= got.history_id
    assert (await get_label(mesh, alice, "ALL")).highest_modseq >= got.history_id
    await expect(grpc.StatusCode.NOT_FOUND, mesh.stub.UpdateDeliveryStatus(pb.UpdateDeliveryStatusRequest(
        name=f"users/{alice}/messages/{sent.id}", recipients=[types_pb2.RecipientStatus(email="z@remote.test")]),
        metadata=mesh.md()), "z@remote.test")
    await assert_counts_exact(mesh, alice)
