"""Threading over real gRPC: References / In-Reply-To, replies before their parents, merges of
threads a message connects, the subject fallback and its limits, GetThread and ListThreads."""

from __future__ import annotations

import struct
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import types_pb2

from mailmesh_common.blobstore import BlobStore
from mailmesh_common.kv import Transaction
from svc_mailbox import keys
from tests.svc_mailbox.conftest import Mesh

NOW = datetime.now(UTC).replace(microsecond=0)


def make_raw(mid: str, subject: str, *, frm: str = "carol@remote.test", to: str = "alice@example.com",
             cc: str = "", irt: str = "", refs: tuple[str, ...] = (), date: datetime | None = None,
             body: str = "hello") -> bytes:
    lines = [f"From: {frm}", f"To: {to}"]
    if cc:
        lines.append(f"Cc: {cc}")
    lines += [f"Subject: {subject}", f"Message-ID: <{mid}>", f"Date: {format_datetime(date or NOW)}"]
    if irt:
        lines.append(f"In-Reply-To: <{irt}>")
    if refs:
        lines.append("References: " + " ".join(f"<{r}>" for r in refs))
    return ("\r\n".join(lines) + "\r\n\r\n" + body + "\r\n").encode()


def stamp(when: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(when)
    return t


async def append(mesh: Mesh, user: str, raw: bytes, *, when: datetime | None = None,
                 labels: tuple[str, ...] = ("INBOX",), unread: bool = True) -> types_pb2.Message:
    req = pb.AppendMessageRequest(parent=f"users/{user}", raw=raw, label_ids=list(labels), unread=unread)
    if when is not None:
        req.internal_date.CopyFrom(stamp(when))
    r = await mesh.stub.AppendMessage(req, metadata=mesh.md(user))
    return r.message


async def get_thread(mesh: Mesh, user: str, thread_id: str) -> types_pb2.Thread:
    r = await mesh.stub.GetThread(pb.GetThreadRequest(name=f"users/{user}/threads/{thread_id}"),
                                  metadata=mesh.md(user))
    return r.thread


async def thread_of(mesh: Mesh, user: str, msg_id: str) -> str:
    r = await mesh.stub.GetMessage(pb.GetMessageRequest(name=f"users/{user}/messages/{msg_id}"),
                                   metadata=mesh.md(user))
    return r.message.thread_id


async def list_threads(mesh: Mesh, user: str, **kw: object) -> list[types_pb2.Thread]:
    r = await mesh.stub.ListThreads(pb.ListThreadsRequest(parent="users/me", **kw),  # type: ignore[arg-type]
                                    metadata=mesh.md(user))
    return list(r.threads)


async def test_reply_joins_parent_thread(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    a = await append(mesh, alice, make_raw("a@x", "Plan", date=NOW - timedelta(hours=3)),
                     when=NOW - timedelta(hours=3))
    b = await append(mesh, alice, make_raw("b@x", "Re: Plan", frm="alice@example.com", to="carol@remote.test",
                                           irt="a@x", refs=("a@x",), date=NOW - timedelta(hours=2)),
                     when=NOW - timedelta(hours=2))
    # References only (no In-Reply-To), from someone new, with an unrelated subject
    c = await append(mesh, alice, make_raw("c@x", "something else", frm="dave@other.test",
                                           refs=("a@x", "b@x"), date=NOW - timedelta(hours=1)),
                     when=NOW - timedelta(hours=1))
    assert a.thread_id == b.thread_id == c.thread_id
    t = await get_thread(mesh, alice, a.thread_id)
    assert [m.id for m in t.messages] == [a.id, b.id, c.id]
    assert t.message_count == 3
    assert t.subject == "Plan"
    assert t.snippet == c.snippet


async def test_reply_before_parent(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    reply = await append(mesh, alice, make_raw("r@x", "Re: Offsite", frm="bob@example.com",
                                               to="carol@remote.test", cc="alice@example.com", irt="p@x",
                                               refs=("p@x",)), when=NOW)
    parent = await append(mesh, alice, make_raw("p@x", "Offsite", date=NOW - timedelta(hours=1)),
                          when=NOW - timedelta(hours=1))
    assert parent.thread_id == reply.thread_id
    t = await get_thread(mesh, alice, reply.thread_id)
    assert [m.id for m in t.messages] == [parent.id, reply.id]  # oldest first
    assert t.message_count == 2
    assert t.subject == "Offsite"  # the subject of the (late) first message
    # a later reply to the reply joins too
    r2 = await append(mesh, alice, make_raw("r2@x", "Re: Offsite", irt="r@x", refs=("p@x", "r@x")))
    assert r2.thread_id == reply.thread_id


async def test_orphans_merged_by_connecting_message(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    # two replies whose parents are missing, with different subjects and senders: two threads
    r1 = await append(mesh, alice, make_raw("r1@x", "Re: Alpha", frm="erin@remote.test", irt="x@x",
                                            refs=("x@x",), date=NOW - timedelta(minutes=30)),
                      when=NOW - timedelta(minutes=30))
    r2 = await append(mesh, alice, make_raw("r2@x", "Re: Beta", frm="frank@remote.test", irt="y@x",
                                            refs=("x@x", "y@x")[1:], date=NOW - timedelta(minutes=20)),
                      when=NOW - timedelta(minutes=20))
    assert r1.thread_id != r2.thread_id
    before = await mesh.stub.ListChanges(pb.ListChangesRequest(parent="users/me"), metadata=mesh.md(alice))
    modseq = before.highest_modseq
    # y@x arrives: its own id is reserved by r2's thread, its References name x@x (r1's thread)
    y = await append(mesh, alice, make_raw("y@x", "Beta", frm="frank@remote.test", irt="x@x", refs=("x@x",),
                                           date=NOW - timedelta(minutes=40)), when=NOW - timedelta(minutes=40))
    t1, t2 = await thread_of(mesh, alice, r1.id), await thread_of(mesh, alice, r2.id)
    assert t1 == t2 == y.thread_id
    old = r1.thread_id if y.thread_id == r2.thread_id else r2.thread_id
    assert old != y.thread_id
    # the old id still resolves, to the merged thread
    via_old = await get_thread(mesh, alice, old)
    assert via_old.id == y.thread_id
    assert via_old.message_count == 3
    assert [m.id for m in via_old.messages] == [y.id, r1.id, r2.id]
    # the moved message is recorded in the changelog
    ch = await mesh.stub.ListChanges(pb.ListChangesRequest(parent="users/me", since_modseq=modseq),
                                     metadata=mesh.md(alice))
    moved = [c for c in ch.changes if c.type == types_pb2.CHANGE_TYPE_THREAD_CHANGED]
    moved_msg = r1.id if old == r1.thread_id else r2.id
    assert [c.message_id for c in moved] == [moved_msg]
    assert moved[0].thread_id == y.thread_id
    added = [c for c in ch.changes if c.type == types_pb2.CHANGE_TYPE_MESSAGE_ADDED]
    assert [c.message_id for c in added] == [y.id]
    # one thread listed, counted once
    listed = await list_threads(mesh, alice, label_id="INBOX")
    assert [t.id for t in listed] == [y.thread_id]
    assert listed[0].message_count == 3
    labels = await mesh.stub.GetLabel(pb.GetLabelRequest(name="users/me/labels/INBOX"), metadata=mesh.md(alice))
    assert labels.label.threads_total == 1
    # a reply to the old thread's message lands in the merged thread
    r3 = await append(mesh, alice, make_raw("r3@x", "Re: Alpha", irt="r1@x", refs=("r1@x",)))
    assert r3.thread_id == y.thread_id


async def test_merge_of_three_threads(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    ids = []
    for i, who in enumerate(("g", "h", "i")):
        m = await append(mesh, alice, make_raw(f"o{i}@x", f"Re: topic {i}", frm=f"{who}@remote.test",
                                               irt=f"p{i}@x"), when=NOW - timedelta(minutes=10 - i))
        ids.append(m)
    assert len({m.thread_id for m in ids}) == 3
    hub = await append(mesh, alice, make_raw("hub@x", "Re: all", refs=("p0@x", "p1@x", "p2@x")))
    t = await get_thread(mesh, alice, hub.thread_id)
    assert t.message_count == 4
    for m in ids:
        assert (await get_thread(mesh, alice, m.thread_id)).id == hub.thread_id
    assert [x.id for x in await list_threads(mesh, alice)] == [hub.thread_id]


async def test_subject_fallback(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    first = await append(mesh, alice, make_raw("s1@x", "Budget", date=NOW - timedelta(days=3)),
                         when=NOW - timedelta(days=3))
    # no threading headers; the same two people; "Re:" stripped
    reply = await append(mesh, alice, make_raw("s2@x", "Re: Budget", frm="alice@example.com",
                                               to="carol@remote.test", date=NOW - timedelta(days=2)),
                         labels=("SENT",), when=NOW - timedelta(days=2))
    # list tag and case and whitespace normalized
    tagged = await append(mesh, alice, make_raw("s3@x", "[finance] RE:  budget", cc="alice@example.com",
                                                to="team@remote.test", date=NOW - timedelta(days=1)),
                          when=NOW - timedelta(days=1))
    fwd = await append(mesh, alice, make_raw("s4@x", "Fwd: Re: [finance] Budget", frm="alice@example.com",
                                             to="carol@remote.test"), labels=("SENT",))
    assert first.thread_id == reply.thread_id == tagged.thread_id == fwd.thread_id
    t = await get_thread(mesh, alice, first.thread_id)
    assert t.message_count == 4
    assert sorted(t.label_ids) == ["INBOX", "SENT"]


async def test_subject_collision_between_strangers(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    a = await append(mesh, alice, make_raw("c1@x", "Budget", frm="carol@remote.test"))
    # only alice in common: not the same conversation
    b = await append(mesh, alice, make_raw("c2@x", "Re: Budget", frm="dave@other.test"))
    assert a.thread_id != b.thread_id
    # dave again: joins his own thread, not carol's
    c = await append(mesh, alice, make_raw("c3@x", "Re: Budget", frm="dave@other.test"))
    assert c.thread_id == b.thread_id
    # messages with an empty subject never thread by subject
    e1 = await append(mesh, alice, make_raw("e1@x", "", frm="carol@remote.test"))
    e2 = await append(mesh, alice, make_raw("e2@x", "Re:", frm="carol@remote.test"))
    assert e1.thread_id != e2.thread_id


async def test_subject_window_is_30_days_of_message_dates(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    old = NOW - timedelta(days=40)
    first = await append(mesh, alice, make_raw("w1@x", "Report", date=old), when=old)
    # 5 days after the first message (but 35 days before now): same conversation
    second = await append(mesh, alice, make_raw("w2@x", "Re: Report", date=old + timedelta(days=5)),
                          when=old + timedelta(days=5))
    assert second.thread_id == first.thread_id
    # 35 days after the thread's newest message: a new thread
    late = await append(mesh, alice, make_raw("w3@x", "Re: Report"), when=NOW)
    assert late.thread_id != first.thread_id
    # an imported message dated between the two joins the older one (closest in time)
    mid_ = await append(mesh, alice, make_raw("w4@x", "Re: Report", date=old + timedelta(days=10)),
                        when=old + timedelta(days=10))
    assert mid_.thread_id == first.thread_id
    # more than 30 days before the oldest: a new thread too
    ancient = await append(mesh, alice, make_raw("w5@x", "Report", date=old - timedelta(days=31)),
                           when=old - timedelta(days=31))
    assert ancient.thread_id not in (first.thread_id, late.thread_id)


async def test_deliver_message_threads_like_append(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    blobs = BlobStore(mesh.settings.data_dir / "blobs")
    out = []
    for i, raw in enumerate((make_raw("d2@x", "Re: Ship", irt="d1@x"), make_raw("d1@x", "Ship"))):
        ref = await blobs.put(raw)
        r = await mesh.stub.DeliverMessage(pb.DeliverMessageRequest(parent=f"users/{alice}", ingest_id=f"ing-{i}",
                                                                    blob_ref=ref), metadata=mesh.md())
        out.append(r.message)
    assert out[0].thread_id == out[1].thread_id


async def test_get_thread_unknown(mesh: Mesh, users: dict[str, str]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get_thread(mesh, users["alice"], "0000000000000000")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_threads_order_and_unread(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    x1 = await append(mesh, alice, make_raw("x1@x", "X"), when=NOW - timedelta(hours=5))
    y1 = await append(mesh, alice, make_raw("y1@x", "Y", frm="dave@other.test"), when=NOW - timedelta(hours=4))
    z1 = await append(mesh, alice, make_raw("z1@x", "Z", frm="erin@remote.test"), when=NOW - timedelta(hours=3))
    listed = await list_threads(mesh, alice, label_id="INBOX")
    assert [t.id for t in listed] == [z1.thread_id, y1.thread_id, x1.thread_id]
    # new activity in X moves it to the top, once
    x2 = await append(mesh, alice, make_raw("x2@x", "Re: X", irt="x1@x"), when=NOW - timedelta(hours=1))
    assert x2.thread_id == x1.thread_id
    listed = await list_threads(mesh, alice, label_id="INBOX")
    assert [t.id for t in listed] == [x1.thread_id, z1.thread_id, y1.thread_id]
    assert listed[0].message_count == 2
    assert listed[0].last_message_time.ToDatetime(tzinfo=UTC) == NOW - timedelta(hours=1)
    # paging walks the same order without repeats
    page1 = await mesh.stub.ListThreads(pb.ListThreadsRequest(parent="users/me", label_id="INBOX", page_size=2),
                                        metadata=mesh.md(alice))
    page2 = await mesh.stub.ListThreads(pb.ListThreadsRequest(parent="users/me", label_id="INBOX", page_size=2,
                                                              page_token=page1.next_page_token),
                                        metadata=mesh.md(alice))
    assert [t.id for t in [*page1.threads, *page2.threads]] == [x1.thread_id, z1.thread_id, y1.thread_id]
    # read X and Z: only Y is unread
    await mesh.stub.BatchModifyMessages(pb.BatchModifyMessagesRequest(parent="users/me", ids=[x1.id, x2.id, z1.id],
                                                                      unread=False), metadata=mesh.md(alice))
    unread = await list_threads(mesh, alice, label_id="INBOX", unread_only=True)
    assert [t.id for t in unread] == [y1.thread_id]
    # one unread message makes its thread unread again
    await mesh.stub.BatchModifyMessages(pb.BatchModifyMessagesRequest(parent="users/me", ids=[x1.id], unread=True),
                                        metadata=mesh.md(alice))
    unread = await list_threads(mesh, alice, label_id="INBOX", unread_only=True)
    assert [t.id for t in unread] == [x1.thread_id, y1.thread_id]
    assert unread[0].unread


async def test_threads_are_per_user(mesh: Mesh, users: dict[str, str]) -> None:
    alice, bob = users["alice"], users["bob"]
    a = await append(mesh, alice, make_raw("u1@x", "Shared"))
    b = await append(mesh, bob, make_raw("u2@x", "Re: Shared", irt="u1@x", to="bob@example.com"))
    assert a.thread_id != b.thread_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await get_thread(mesh, bob, a.thread_id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_merge_keeps_label_counts(mesh: Mesh, users: dict[str, str]) -> None:
    """A merge of threads spread over several labels leaves each label with one thread."""
    alice = users["alice"]
    start = time.monotonic()
    a = await append(mesh, alice, make_raw("m1@x", "Re: Quarterly", irt="m0@x"), labels=("INBOX",))
    b = await append(mesh, alice, make_raw("m2@x", "Re: Numbers", frm="alice@example.com", to="zed@remote.test",
                                           irt="n0@x"), labels=("SENT",))
    for lid in ("INBOX", "SENT"):
        got = await mesh.stub.GetLabel(pb.GetLabelRequest(name=f"users/me/labels/{lid}"), metadata=mesh.md(alice))
        assert got.label.threads_total == 1
    assert len(await list_threads(mesh, alice)) == 2
    join = await append(mesh, alice, make_raw("m0@x", "Quarterly", refs=("n0@x",)))
    assert (await thread_of(mesh, alice, a.id)) == (await thread_of(mesh, alice, b.id)) == join.thread_id
    for lid, n in (("INBOX", 1), ("SENT", 1)):
        got = await mesh.stub.GetLabel(pb.GetLabelRequest(name=f"users/me/labels/{lid}"), metadata=mesh.md(alice))
        assert got.label.threads_total == n
    assert [t.id for t in await list_threads(mesh, alice, label_id="SENT")] == [join.thread_id]
    assert [t.id for t in await list_threads(mesh, alice)] == [join.thread_id]
    assert time.monotonic() - start < 10


async def _thread_stats_problems(mesh: Mesh, user: str) -> list[str]:
    """Every stored (thread, label) stat and thread summary compared with a recount of the
    thread's members (the stats are kept by difference, never by walking the thread)."""
    db = mesh.ctx.components["mailbox"].db

    def fn(tr: Transaction) -> list[str]:
        problems: list[str] = []
        b, e = keys.u_range(user, "tl")
        for k, v in tr.get_range(b, e):
            tid, label = keys.unpack(k)[-2:]
            mb, me = keys.u_range(user, "tlm", tid, label)
            members = [keys.unpack(mk)[-2:] for mk, _ in tr.get_range(mb, me)]
            msgs = [types_pb2.Message.FromString(tr.get(keys.u(user, "msg", mid)) or b"") for _, mid in members]
            want = (len(msgs), sum(m.unread for m in msgs), sum(m.starred for m in msgs),
                    max(ts for ts, _ in members) if members else 0)
            got = struct.unpack(">qqqq", v)
            if got != want:
                problems.append(f"stats of ({tid}, {label}): stored {got}, members say {want}")
            if label == "*":
                thread = types_pb2.Thread.FromString(tr.get(keys.u(user, "thr", tid)) or b"")
                newest = max(zip(members, msgs, strict=True))[1]
                if (thread.message_count, thread.snippet, thread.last_message_time) != (
                        len(msgs), newest.snippet, newest.internal_date):
                    problems.append(f"summary of {tid} does not follow its newest member {newest.id}")
        return problems

    return await db.run(fn, readonly=True)


async def test_thread_stats_follow_members_in_any_order(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    t = NOW - timedelta(days=1)
    a = await append(mesh, alice, make_raw("s-a@x", "Stats", date=t, body="first"), when=t)
    b = await append(mesh, alice, make_raw("s-b@x", "Re: Stats", irt="s-a@x", refs=("s-a@x",), body="newest"),
                     when=t + timedelta(hours=5))
    # older than both (a late reply), and one with the same time as the newest
    c = await append(mesh, alice, make_raw("s-c@x", "Re: Stats", irt="s-a@x", refs=("s-a@x",), body="late"),
                     when=t - timedelta(hours=2))
    d = await append(mesh, alice, make_raw("s-d@x", "Re: Stats", irt="s-a@x", refs=("s-a@x",), body="tie"),
                     when=t + timedelta(hours=5), labels=("INBOX", "IMPORTANT"))
    other = await append(mesh, alice, make_raw("o@x", "Other", body="other"), when=t + timedelta(hours=3))
    assert a.thread_id == b.thread_id == c.thread_id == d.thread_id != other.thread_id
    assert await _thread_stats_problems(mesh, alice) == []
    assert [th.id for th in await list_threads(mesh, alice, label_id="INBOX")] == [a.thread_id, other.thread_id]

    async def trash(msg_id: str) -> None:
        await mesh.stub.TrashMessage(pb.TrashMessageRequest(name=f"users/{alice}/messages/{msg_id}"),
                                     metadata=mesh.md(alice))

    # the two newest leave INBOX: the thread falls back to its next newest member, behind "Other"
    await trash(b.id)
    assert await _thread_stats_problems(mesh, alice) == []
    await trash(d.id)
    assert await _thread_stats_problems(mesh, alice) == []
    assert [th.id for th in await list_threads(mesh, alice, label_id="INBOX")] == [other.thread_id, a.thread_id]
    await mesh.stub.UntrashMessage(pb.UntrashMessageRequest(name=f"users/{alice}/messages/{b.id}"),
                                   metadata=mesh.md(alice))
    await mesh.stub.BatchModifyMessages(pb.BatchModifyMessagesRequest(
        parent="users/me", ids=[b.id, c.id], unread=False, starred=True), metadata=mesh.md(alice))
    assert await _thread_stats_problems(mesh, alice) == []
    assert [th.id for th in await list_threads(mesh, alice, label_id="INBOX")] == [a.thread_id, other.thread_id]
    for m in (b, a):
        await mesh.stub.DeleteMessage(pb.DeleteMessageRequest(name=f"users/{alice}/messages/{m.id}"),
                                      metadata=mesh.md(alice))
        assert await _thread_stats_problems(mesh, alice) == []
    thread = await get_thread(mesh, alice, a.thread_id)
    assert [m.id for m in thread.messages] == [c.id, d.id] and thread.snippet.startswith("tie")
