"""Labels over real gRPC: listing with counts, creating (nesting, uniqueness, reserved names),
renaming with nested children, deleting in bounded batches, and the IMAP status fields."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import types_pb2

from svc_mailbox import jobs
from tests.svc_mailbox.conftest import Mesh, fresh_users
from tests.svc_mailbox.test_messages import (
    BASE_TS,
    append,
    assert_counts_exact,
    expect,
    get_label,
    get_message,
    modify,
    raw_message,
    walk_messages,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

SYSTEM_ORDER = ["INBOX", "SENT", "DRAFTS", "SPAM", "TRASH", "STARRED", "IMPORTANT", "ALL"]


async def create(mesh: Mesh, user: str, name: str) -> types_pb2.Label:
    return (await mesh.stub.CreateLabel(pb.CreateLabelRequest(parent="users/me", name=name),
                                        metadata=mesh.md(user))).label


async def rename(mesh: Mesh, user: str, label_id: str, name: str) -> types_pb2.Label:
    return (await mesh.stub.UpdateLabel(pb.UpdateLabelRequest(
        name=f"users/me/labels/{label_id}", label=types_pb2.Label(name=name), update_mask=FieldMask(paths=["name"])),
        metadata=mesh.md(user))).label


async def list_labels(mesh: Mesh, user: str) -> list[types_pb2.Label]:
    return list((await mesh.stub.ListLabels(pb.ListLabelsRequest(parent="users/me"), metadata=mesh.md(user))).labels)


async def test_list_labels_system_first_with_counts(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    zed = await create(mesh, alice, "zed")
    alpha = await create(mesh, alice, "Alpha")
    await append(mesh, alice, labels=["INBOX", zed.id], unread=True, subject="one")
    await append(mesh, alice, labels=["INBOX"], unread=False, subject="two")
    labels = await list_labels(mesh, alice)
    assert [lb.id for lb in labels] == [*SYSTEM_ORDER, alpha.id, zed.id]
    assert all(lb.type == types_pb2.LABEL_TYPE_SYSTEM for lb in labels[:8])
    assert all(lb.type == types_pb2.LABEL_TYPE_USER for lb in labels[8:])
    by_id = {lb.id: lb for lb in labels}
    assert by_id["ALL"].name == "All Mail"
    assert (by_id["INBOX"].messages_total, by_id["INBOX"].messages_unread, by_id["INBOX"].threads_total) == (2, 1, 2)
    assert (by_id[zed.id].messages_total, by_id[zed.id].messages_unread) == (1, 1)
    assert by_id[alpha.id].messages_total == 0
    got = await get_label(mesh, alice, "inbox")  # system ids in any case
    assert got.id == "INBOX" and got.messages_total == 2
    await expect(grpc.StatusCode.NOT_FOUND, get_label(mesh, alice, "Label_999"), "Label_999")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.GetLabel(
        pb.GetLabelRequest(name="users/me/label/INBOX"), metadata=mesh.md(alice)), "name")
    await expect(grpc.StatusCode.NOT_FOUND, mesh.stub.ListLabels(
        pb.ListLabelsRequest(parent="users/nobody"), metadata=mesh.md()))


async def test_create_label_names(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    work = await create(mesh, alice, "Work")
    nested = await create(mesh, alice, "Work/Projects")
    assert work.id != nested.id and nested.name == "Work/Projects" and nested.type == types_pb2.LABEL_TYPE_USER
    assert nested.uid_validity and nested.uid_next == 1 and nested.messages_total == 0
    assert (await create(mesh, alice, "  Spaced out  ")).name == "Spaced out"
    for dup in ("work", "WORK", "Work/projects"):
        await expect(grpc.StatusCode.ALREADY_EXISTS, create(mesh, alice, dup), "already exists")
    for reserved in ("INBOX", "inbox", "Trash", "STARRED", "All Mail", "unread", "ALL"):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, create(mesh, alice, reserved), "reserved")
    for bad, why in (("", "empty"), ("   ", "empty"), ("/Work", "/"), ("Work/", "/"), ("a//b", "/"),
                     ("a\x00b", "control"), ("tab\tbed", "control"), ("x" * 226, "225"), ("a/ b", "spaces")):
        await expect(grpc.StatusCode.INVALID_ARGUMENT, create(mesh, alice, bad), why)
    assert (await create(mesh, alice, "x" * 225)).name == "x" * 225
    names = [lb.name for lb in await list_labels(mesh, alice) if lb.type == types_pb2.LABEL_TYPE_USER]
    assert names == ["Spaced out", "Work", "Work/Projects", "x" * 225]


async def test_rename_moves_nested_children(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    work = await create(mesh, alice, "Work")
    proj = await create(mesh, alice, "Work/Projects")
    deep = await create(mesh, alice, "Work/Projects/2026")
    other = await create(mesh, alice, "Workshop")  # a prefix, not a child
    m = await append(mesh, alice, labels=[proj.id])
    before = await get_label(mesh, alice, proj.id)

    renamed = await rename(mesh, alice, work.id, "Job")
    assert renamed.id == work.id and renamed.name == "Job"
    names = {lb.id: lb.name for lb in await list_labels(mesh, alice)}
    assert names[proj.id] == "Job/Projects" and names[deep.id] == "Job/Projects/2026" and names[other.id] == "Workshop"
    after = await get_label(mesh, alice, proj.id)
    assert after.uid_validity == before.uid_validity and after.messages_total == 1  # same folder, same UIDs
    assert proj.id in (await get_message(mesh, alice, m.id)).label_ids
    # the old names are free again, the new ones taken (case-insensitively)
    await create(mesh, alice, "Work")
    await expect(grpc.StatusCode.ALREADY_EXISTS, create(mesh, alice, "job/projects"))
    await expect(grpc.StatusCode.ALREADY_EXISTS, rename(mesh, alice, other.id, "JOB"), "already exists")
    assert (await rename(mesh, alice, work.id, "JOB")).name == "JOB"  # a case change of itself
    # renaming a child under another parent
    assert (await rename(mesh, alice, deep.id, "Archive/2026")).name == "Archive/2026"

    for system in ("INBOX", "inbox", "ALL", "STARRED"):
        await expect(grpc.StatusCode.PERMISSION_DENIED, rename(mesh, alice, system, "Mine"), "system")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, rename(mesh, alice, other.id, "SENT"), "reserved")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, rename(mesh, alice, other.id, ""), "empty")
    await expect(grpc.StatusCode.NOT_FOUND, rename(mesh, alice, "Label_999", "x"), "Label_999")
    await expect(grpc.StatusCode.INVALID_ARGUMENT, mesh.stub.UpdateLabel(pb.UpdateLabelRequest(
        name=f"users/me/labels/{other.id}", label=types_pb2.Label(name="y", messages_total=5),
        update_mask=FieldMask(paths=["messages_total"])), metadata=mesh.md(alice)), "update_mask")
    # no mask: the name
    r = await mesh.stub.UpdateLabel(pb.UpdateLabelRequest(name=f"users/me/labels/{other.id}",
                                                          label=types_pb2.Label(name="Shop")), metadata=mesh.md(alice))
    assert r.label.name == "Shop"


async def test_delete_label_spanning_several_batches(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    big = await create(mesh, alice, "Big")
    keep = await create(mesh, alice, "Keep")
    n = 2 * jobs.BATCH + 57
    assert n > 250
    msgs: list[types_pb2.Message] = []
    for start in range(0, n, 100):
        msgs += await asyncio.gather(*(
            append(mesh, alice, raw_message(f"m{i}", msgid=f"dl{i}@x"), labels=["INBOX", big.id] + ([keep.id] if i % 2 else []),
                   unread=i % 3 == 0, starred=i % 5 == 0, when=BASE_TS + i)
            for i in range(start, min(n, start + 100))))
    # a few in TRASH remember the label
    for m in msgs[:3]:
        await mesh.stub.TrashMessage(pb.TrashMessageRequest(name=f"users/me/messages/{m.id}"), metadata=mesh.md(alice))
    before = await assert_counts_exact(mesh, alice)
    assert before[big.id].messages_total == n - 3

    await mesh.stub.DeleteLabel(pb.DeleteLabelRequest(name=f"users/me/labels/{big.id}"), metadata=mesh.md(alice))
    await expect(grpc.StatusCode.NOT_FOUND, get_label(mesh, alice, big.id))
    await expect(grpc.StatusCode.NOT_FOUND, walk_messages(mesh, alice, big.id))
    await expect(grpc.StatusCode.NOT_FOUND, append(mesh, alice, labels=[big.id]))
    everything = await walk_messages(mesh, alice, "ALL")
    assert all(big.id not in m.label_ids for m in everything)
    assert all(big.id not in m.uids for m in everything)
    after = await assert_counts_exact(mesh, alice)
    assert big.id not in after
    assert after["INBOX"].messages_total == n - 3 and after[keep.id].messages_total == before[keep.id].messages_total
    assert after["INBOX"].messages_unread == before["INBOX"].messages_unread
    # untrash does not bring the deleted label back
    u = await mesh.stub.UntrashMessage(pb.UntrashMessageRequest(name=f"users/me/messages/{msgs[0].id}"),
                                       metadata=mesh.md(alice))
    assert big.id not in u.message.label_ids and "INBOX" in u.message.label_ids
    # a new label with the same name is a new label (new id, new UIDVALIDITY, UIDs from 1)
    again = await create(mesh, alice, "Big")
    assert again.id != big.id and again.uid_validity != big.uid_validity and again.uid_next == 1
    assert again.messages_total == 0 and again.highest_modseq == 0
    m = await append(mesh, alice, labels=[again.id])
    assert m.uids[again.id] == 1

    # emptying a TRASH that needs several bounded batches
    everything = await walk_messages(mesh, alice, "ALL")
    await modify(mesh, alice, [x.id for x in everything], add_label_ids=["TRASH"])
    r = await mesh.stub.EmptyLabel(pb.EmptyLabelRequest(name="users/me/labels/TRASH"), metadata=mesh.md(alice))
    assert r.deleted_count == len(everything) + 2 > 2 * jobs.BATCH
    emptied = await assert_counts_exact(mesh, alice)
    assert all(lb.messages_total == 0 and lb.threads_total == 0 for lb in emptied.values())
    acct = (await mesh.stub.GetAccount(pb.GetAccountRequest(name="users/me"), metadata=mesh.md(alice))).account
    assert (acct.messages_total, acct.used_bytes) == (0, 0)

    for system in ("INBOX", "trash", "ALL"):
        await expect(grpc.StatusCode.PERMISSION_DENIED, mesh.stub.DeleteLabel(
            pb.DeleteLabelRequest(name=f"users/me/labels/{system}"), metadata=mesh.md(alice)), "system")
    await expect(grpc.StatusCode.NOT_FOUND, mesh.stub.DeleteLabel(
        pb.DeleteLabelRequest(name=f"users/me/labels/{big.id}"), metadata=mesh.md(alice)))


async def test_imap_status_fields(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    work = await create(mesh, alice, "Work")
    inbox0 = await get_label(mesh, alice, "INBOX")
    labels = await list_labels(mesh, alice)
    assert all(lb.uid_validity for lb in labels)
    assert all(lb.uid_next == 1 and lb.highest_modseq == 0 for lb in labels)

    last = {"INBOX": 0, work.id: 0}
    seen_modseqs: list[int] = []

    async def check(changed: Sequence[str], untouched: Sequence[str] = ()) -> None:
        for lid in changed:
            lb = await get_label(mesh, alice, lid)
            assert lb.highest_modseq > last[lid], lid
            last[lid] = lb.highest_modseq
            seen_modseqs.append(lb.highest_modseq)
        for lid in untouched:
            assert (await get_label(mesh, alice, lid)).highest_modseq == last[lid], lid

    a = await append(mesh, alice, labels=["INBOX"])
    assert a.uids["INBOX"] == 1 and (await get_label(mesh, alice, "INBOX")).uid_next == 2
    await check(["INBOX"], [work.id])
    b = await append(mesh, alice, labels=["INBOX", work.id])
    assert b.uids["INBOX"] == 2 and b.uids[work.id] == 1
    await check(["INBOX", work.id])
    await modify(mesh, alice, [a.id], unread=False)
    await check(["INBOX"], [work.id])
    await modify(mesh, alice, [b.id], add_keywords=["$x"])
    await check(["INBOX", work.id])
    await modify(mesh, alice, [b.id], starred=True)
    await check(["INBOX", work.id])
    await modify(mesh, alice, [b.id], remove_label_ids=[work.id])  # leaving a label is a change to it
    await check(["INBOX", work.id])
    await mesh.stub.TrashMessage(pb.TrashMessageRequest(name=f"users/me/messages/{a.id}"), metadata=mesh.md(alice))
    await check(["INBOX"], [work.id])
    await mesh.stub.DeleteMessage(pb.DeleteMessageRequest(name=f"users/me/messages/{b.id}"), metadata=mesh.md(alice))
    await check(["INBOX"], [work.id])
    inbox = await get_label(mesh, alice, "INBOX")
    assert inbox.uid_validity == inbox0.uid_validity  # stable
    assert inbox.uid_next == 3 and inbox.messages_total == 0
    acct = (await mesh.stub.GetAccount(pb.GetAccountRequest(name="users/me"), metadata=mesh.md(alice))).account
    assert acct.highest_modseq >= max(seen_modseqs)
