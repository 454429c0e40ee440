"""Many concurrent writers over real gRPC never lose an update: afterwards every counter equals a
recount through the listings and UID maps, and every single change is visible."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from mailmesh.v1 import mailbox_service_pb2 as pb

from tests.svc_mailbox.conftest import Mesh, fresh_users
from tests.svc_mailbox.test_messages import (
    BASE_TS,
    append,
    assert_counts_exact,
    get_message,
    modify,
    raw_message,
    walk_messages,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_concurrent_flips_and_appends_keep_counters_exact(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    labels = [(await mesh.stub.CreateLabel(pb.CreateLabelRequest(parent="users/me", name=f"L{i}"),
                                           metadata=mesh.md(alice))).label.id for i in range(3)]
    msgs = list(await asyncio.gather(*(
        append(mesh, alice, raw_message(f"base {i}"), labels=["INBOX"] + labels[: i % 4], when=BASE_TS + i)
        for i in range(20))))
    ids = [m.id for m in msgs]
    rnd = random.Random(42)

    def op() -> dict[str, object]:
        kind = rnd.choice(["unread", "starred", "label", "unlabel", "keyword", "inbox"])
        chosen = rnd.sample(ids[:5], 2) if rnd.random() < 0.5 else rnd.sample(ids, rnd.randint(1, 8))  # hot + wide
        if kind == "unread":
            return {"ids": chosen, "unread": rnd.random() < 0.5}
        if kind == "starred":
            return {"ids": chosen, "starred": rnd.random() < 0.5}
        if kind == "label":
            return {"ids": chosen, "add_label_ids": [rnd.choice(labels)]}
        if kind == "unlabel":
            return {"ids": chosen, "remove_label_ids": [rnd.choice(labels)]}
        if kind == "keyword":
            return {"ids": chosen, "add_keywords": [f"$k{rnd.randint(0, 3)}"]}
        return {"ids": chosen, "remove_label_ids": ["INBOX"]} if rnd.random() < 0.5 else {
            "ids": chosen, "add_label_ids": ["INBOX"]}

    ops = [op() for _ in range(50)]

    async def flip(kw: dict[str, object]) -> None:
        await modify(mesh, alice, **kw)  # type: ignore[arg-type]

    async def trash_cycle(mid: str) -> None:
        await mesh.stub.TrashMessage(pb.TrashMessageRequest(name=f"users/me/messages/{mid}"), metadata=mesh.md(alice))
        await mesh.stub.UntrashMessage(pb.UntrashMessageRequest(name=f"users/me/messages/{mid}"),
                                       metadata=mesh.md(alice))

    new_msgs = [append(mesh, alice, raw_message(f"new {i}"), labels=["INBOX", labels[i % 3]],
                       unread=i % 2 == 0, starred=i % 5 == 0, when=BASE_TS + 100 + i) for i in range(30)]
    await asyncio.gather(*(flip(o) for o in ops), *new_msgs, *(trash_cycle(m) for m in ids[15:18]))
    await assert_counts_exact(mesh, alice)
    acct = (await mesh.stub.GetAccount(pb.GetAccountRequest(name="users/me"), metadata=mesh.md(alice))).account
    assert acct.messages_total == 50


async def test_no_lost_update_on_one_message(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    m = await append(mesh, alice)
    # 50 writers each add their own keyword to the same message: all 50 survive
    await asyncio.gather(*(modify(mesh, alice, [m.id], add_keywords=[f"$w{i}"]) for i in range(50)))
    got = await get_message(mesh, alice, m.id)
    assert sorted(got.keywords) == sorted(f"$w{i}" for i in range(50))
    # 50 writers each add their own label to it
    labels = list(await asyncio.gather(*(mesh.stub.CreateLabel(pb.CreateLabelRequest(parent="users/me", name=f"c{i}"),
                                                                metadata=mesh.md(alice)) for i in range(50))))
    label_ids = [r.label.id for r in labels]
    assert len(set(label_ids)) == 50
    await asyncio.gather(*(modify(mesh, alice, [m.id], add_label_ids=[lid]) for lid in label_ids))
    got = await get_message(mesh, alice, m.id)
    assert set(label_ids) <= set(got.label_ids)
    assert sorted(got.uids[lid] for lid in label_ids) == [1] * 50
    # and 50 alternating read/unread flips leave the counters matching the final state
    await asyncio.gather(*(modify(mesh, alice, [m.id], unread=i % 2 == 0) for i in range(50)))
    final = await assert_counts_exact(mesh, alice)
    unread = (await get_message(mesh, alice, m.id)).unread
    assert final["INBOX"].messages_unread == int(unread)
    assert all(final[lid].messages_unread == int(unread) for lid in label_ids)


async def test_concurrent_creates_and_idempotent_appends(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    results = await asyncio.gather(*(mesh.stub.CreateLabel(
        pb.CreateLabelRequest(parent="users/me", name="Same" if i % 2 else "SAME"), metadata=mesh.md(alice))
        for i in range(20)), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1 and len(failed) == 19
    assert all(e.code() == grpc.StatusCode.ALREADY_EXISTS for e in failed)
    raw = raw_message("retry")
    appended = await asyncio.gather(*(append(mesh, alice, raw, key="same-key") for _ in range(20)))
    assert len({m.id for m in appended}) == 1
    assert len(await walk_messages(mesh, alice, "INBOX")) == 1


async def test_delete_label_while_writers_use_it(shared_mesh: Mesh) -> None:
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    lid = (await mesh.stub.CreateLabel(pb.CreateLabelRequest(parent="users/me", name="Doomed"),
                                       metadata=mesh.md(alice))).label.id
    base = list(await asyncio.gather(*(append(mesh, alice, raw_message(f"d{i}"), labels=["INBOX", lid],
                                              when=BASE_TS + i) for i in range(150))))

    async def writer(i: int) -> None:
        try:
            if i % 2:
                await append(mesh, alice, raw_message(f"w{i}"), labels=["INBOX", lid], when=BASE_TS + 1000 + i)
            else:
                await modify(mesh, alice, [base[i].id], unread=False, add_label_ids=[lid])
        except grpc.aio.AioRpcError as e:  # after the delete: the label is gone
            assert e.code() == grpc.StatusCode.NOT_FOUND, e.details()

    await asyncio.gather(
        mesh.stub.DeleteLabel(pb.DeleteLabelRequest(name=f"users/me/labels/{lid}"), metadata=mesh.md(alice)),
        *(writer(i) for i in range(40)))
    everything = await walk_messages(mesh, alice, "ALL")
    assert all(lid not in m.label_ids and lid not in m.uids for m in everything)
    await assert_counts_exact(mesh, alice)


async def test_deleting_and_re_adding_the_same_content_never_loses_the_blob(shared_mesh: Mesh) -> None:
    """Identical raw messages share one blob: a delete racing an append of the same bytes must
    not remove the file the new message needs."""
    mesh = shared_mesh
    alice = (await fresh_users(mesh, "alice"))["alice"]
    raw = raw_message("same bytes", "identical content")
    current = await append(mesh, alice, raw)
    for _ in range(15):
        delete = mesh.stub.DeleteMessage(pb.DeleteMessageRequest(name=f"users/me/messages/{current.id}"),
                                         metadata=mesh.md(alice))
        _, current = await asyncio.gather(delete, append(mesh, alice, raw))
        got = await get_message(mesh, alice, current.id, 4)  # RAW
        assert got.raw == raw
    assert len(await walk_messages(mesh, alice, "INBOX")) == 1
