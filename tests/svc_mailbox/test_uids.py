"""IMAP UIDs over real gRPC: ListLabelUids ranges, CHANGEDSINCE, paging with has_more, per-label
UID spaces, and UIDs that are never reused."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from mailmesh.v1 import mailbox_service_pb2 as pb

from svc_mailbox import mailbox
from tests.svc_mailbox.conftest import Mesh, fresh_users
from tests.svc_mailbox.test_messages import BASE_TS, append, expect, get_label, modify, raw_message, walk_uids

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def uids(mesh: Mesh, user: str, label: str, **kw: int) -> pb.ListLabelUidsResponse:
    return await mesh.stub.ListLabelUids(pb.ListLabelUidsRequest(name=f"users/me/labels/{label}", **kw),
                                         metadata=mesh.md(user))


async def test_uid_ranges_map_to_messages(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    work = (await mesh.stub.CreateLabel(pb.CreateLabelRequest(parent="users/me", name="Work"),
                                        metadata=mesh.md(alice))).label
    msgs = []
    for i in range(10):
        msgs.append(await append(mesh, alice, raw_message(f"s{i}", "x" * i), labels=["INBOX"] + ([work.id] if i % 2 else []),
                                 unread=i % 3 == 0, starred=i == 4, keywords=["$k"] if i == 5 else [],
                                 when=BASE_TS + 100 - i))  # UIDs follow arrival, not dates
    r = await uids(mesh, alice, "INBOX")
    assert [e.uid for e in r.entries] == list(range(1, 11)) and not r.has_more
    assert [e.message_id for e in r.entries] == [m.id for m in msgs]
    e4, e5 = r.entries[4], r.entries[5]
    assert e4.starred and not e4.unread and list(e5.keywords) == ["$k"] and r.entries[0].unread
    assert e5.size == msgs[5].size_estimate and e5.internal_date.seconds == BASE_TS + 95
    assert e5.modseq == msgs[5].history_id
    assert r.label.id == "INBOX" and r.label.uid_next == 11 and r.label.messages_total == 10

    w = await uids(mesh, alice, work.id)
    assert [e.uid for e in w.entries] == [1, 2, 3, 4, 5]  # each label has its own UID space
    assert [e.message_id for e in w.entries] == [m.id for m in msgs[1::2]]
    assert [msgs[i].uids[work.id] for i in range(1, 10, 2)] == [1, 2, 3, 4, 5]

    part = await uids(mesh, alice, "INBOX", uid_min=3, uid_max=5)
    assert [e.uid for e in part.entries] == [3, 4, 5] and not part.has_more
    assert [e.uid for e in (await uids(mesh, alice, "INBOX", uid_min=9)).entries] == [9, 10]
    assert [e.uid for e in (await uids(mesh, alice, "INBOX", uid_max=2)).entries] == [1, 2]
    assert (await uids(mesh, alice, "INBOX", uid_min=11)).entries == []
    assert [e.uid for e in (await uids(mesh, alice, "inbox", uid_min=0, uid_max=1)).entries] == [1]
    await expect(grpc.StatusCode.INVALID_ARGUMENT, uids(mesh, alice, "INBOX", uid_min=5, uid_max=4), "uid_max")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, uids(mesh, alice, "INBOX", page_size=-1), "page_size")
    await expect(grpc.StatusCode.NOT_FOUND, uids(mesh, alice, "Label_999"), "Label_999")

    # paging: has_more, continue after the last uid
    pages = []
    uid_min = 1
    while True:
        p = await uids(mesh, alice, "INBOX", uid_min=uid_min, page_size=3)
        pages.append([e.uid for e in p.entries])
        if not p.has_more:
            break
        uid_min = p.entries[-1].uid + 1
    assert pages == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]
    exact = await uids(mesh, alice, "INBOX", uid_max=6, page_size=3, uid_min=4)
    assert [e.uid for e in exact.entries] == [4, 5, 6] and not exact.has_more
    # All Mail and STARRED are folders too
    assert len((await uids(mesh, alice, "ALL")).entries) == 10
    assert [e.message_id for e in (await uids(mesh, alice, "STARRED")).entries] == [msgs[4].id]


async def test_changed_since(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    msgs = [await append(mesh, alice, subject=f"s{i}") for i in range(6)]
    mark = (await get_label(mesh, alice, "INBOX")).highest_modseq
    assert (await uids(mesh, alice, "INBOX", changed_since=mark)).entries == []
    await modify(mesh, alice, [msgs[1].id], unread=False)
    await modify(mesh, alice, [msgs[4].id], add_keywords=["$x"])
    r = await uids(mesh, alice, "INBOX", changed_since=mark)
    assert [e.message_id for e in r.entries] == [msgs[1].id, msgs[4].id] and not r.has_more
    assert all(e.modseq > mark for e in r.entries)
    assert not r.entries[0].unread and list(r.entries[1].keywords) == ["$x"]
    assert len((await uids(mesh, alice, "INBOX", changed_since=0)).entries) == 6
    new = await append(mesh, alice, subject="new")
    r = await uids(mesh, alice, "INBOX", changed_since=mark)
    assert [e.message_id for e in r.entries] == [msgs[1].id, msgs[4].id, new.id]
    # paging among the changed ones
    r = await uids(mesh, alice, "INBOX", changed_since=mark, page_size=2)
    assert [e.message_id for e in r.entries] == [msgs[1].id, msgs[4].id] and r.has_more
    r = await uids(mesh, alice, "INBOX", changed_since=mark, page_size=2, uid_min=r.entries[-1].uid + 1)
    assert [e.message_id for e in r.entries] == [new.id] and not r.has_more


async def test_changed_since_always_makes_progress(shared_mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long run of unchanged messages never yields has_more without an entry to continue after."""
    mesh = shared_mesh
    monkeypatch.setattr(mailbox, "MAX_UID_SCAN", 7)
    alice = (await fresh_users(mesh, "alice"))["alice"]
    msgs = list(await asyncio.gather(*(append(mesh, alice, subject=f"s{i}") for i in range(20))))
    msgs.sort(key=lambda m: m.uids["INBOX"])
    mark = (await get_label(mesh, alice, "INBOX")).highest_modseq
    await modify(mesh, alice, [msgs[17].id], unread=False)
    entries = await walk_uids(mesh, alice, "INBOX", changed_since=mark, page_size=5)
    changed = [e.message_id for e in entries if e.modseq > mark]
    assert changed == [msgs[17].id]
    assert len(entries) <= 4  # at most one unchanged boundary entry per bounded call


async def test_uids_are_never_reused(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    a = await append(mesh, alice, subject="a")
    b = await append(mesh, alice, subject="b")
    assert (a.uids["INBOX"], b.uids["INBOX"]) == (1, 2)
    await mesh.stub.DeleteMessage(pb.DeleteMessageRequest(name=f"users/me/messages/{b.id}"), metadata=mesh.md(alice))
    c = await append(mesh, alice, subject="c")
    assert c.uids["INBOX"] == 3
    # leaving and re-entering a label gives a new UID
    await modify(mesh, alice, [a.id], remove_label_ids=["INBOX"])
    r = await modify(mesh, alice, [a.id], add_label_ids=["INBOX"])
    assert r.messages[0].uids["INBOX"] == 4
    await mesh.stub.TrashMessage(pb.TrashMessageRequest(name=f"users/me/messages/{c.id}"), metadata=mesh.md(alice))
    u = await mesh.stub.UntrashMessage(pb.UntrashMessageRequest(name=f"users/me/messages/{c.id}"),
                                       metadata=mesh.md(alice))
    assert u.message.uids["INBOX"] == 5
    r2 = await uids(mesh, alice, "INBOX")
    assert [(e.uid, e.message_id) for e in r2.entries] == [(4, a.id), (5, c.id)]
    assert r2.label.uid_next == 6
    await mesh.stub.EmptyLabel(pb.EmptyLabelRequest(name="users/me/labels/TRASH"), metadata=mesh.md(alice))
    assert (await append(mesh, alice, subject="d")).uids["INBOX"] == 6
