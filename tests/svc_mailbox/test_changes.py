"""The changelog: ListChanges paging, WatchChanges streaming, the EVENTS relay (one message per
change, Nats-Msg-Id "<user>:<modseq>", no duplicates after a relay crash) and retention."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from mailmesh.v1 import events_pb2, types_pb2
from mailmesh.v1 import mailbox_service_pb2 as pb
from nats.js import JetStreamContext
from nats.js import api as js_api

from mailmesh_common import streams
from mailmesh_common.kv import Transaction, decode_counter, encode_counter, open_database
from svc_mailbox import keys
from tests.svc_mailbox.conftest import Mesh, start_mesh, stop_mesh

WAIT_S = 10.0
T = types_pb2


def make_raw(n: int) -> bytes:
    return (f"From: Carol <carol@remote.test>\r\nTo: alice@example.com\r\nSubject: change {n}\r\n"
            f"Message-ID: <ch-{n}@remote.test>\r\n\r\nbody {n}\r\n").encode()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = WAIT_S) -> None:
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


async def append(mesh: Mesh, user: str, n: int) -> T.Message:
    r = await mesh.stub.AppendMessage(pb.AppendMessageRequest(parent="users/me", raw=make_raw(n),
                                                              label_ids=["INBOX"], unread=True),
                                      metadata=mesh.md(user))
    return r.message


async def modify(mesh: Mesh, user: str, ids: list[str], **kw: object) -> None:
    await mesh.stub.BatchModifyMessages(pb.BatchModifyMessagesRequest(parent="users/me", ids=ids, **kw),  # type: ignore[arg-type]
                                        metadata=mesh.md(user))


async def all_changes(mesh: Mesh, user: str, since: int = 0, page: int = 0) -> list[T.Change]:
    out: list[T.Change] = []
    while True:
        r = await mesh.stub.ListChanges(pb.ListChangesRequest(parent="users/me", since_modseq=since,
                                                              page_size=page), metadata=mesh.md(user))
        out.extend(r.changes)
        if not r.has_more:
            return out
        assert r.changes, "has_more without changes"
        since = r.changes[-1].modseq


async def highest(mesh: Mesh, user: str) -> int:
    r = await mesh.stub.GetAccount(pb.GetAccountRequest(name="users/me"), metadata=mesh.md(user))
    return r.account.highest_modseq


async def events(js: JetStreamContext, user: str, expect: int, within: float = WAIT_S) -> list[tuple[str, T.Change, dict[str, str]]]:
    """Every EVENTS message of the user, read with an ordered ephemeral consumer once at least
    `expect` are stored (bounded wait); returns (Nats-Msg-Id, change, headers)."""
    subject = streams.events_subject(user)

    async def stored() -> bool:
        info = await js.stream_info(streams.EVENTS.name, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0) >= expect
    await eventually(stored, f"{expect} EVENTS messages for {user}", within)
    sub = await js.subscribe(subject, ordered_consumer=True,
                             config=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL))
    out = []
    try:
        while True:
            msg = await sub.next_msg(timeout=5)
            headers = dict(msg.headers or {})
            out.append((headers.get("Nats-Msg-Id", ""), events_pb2.MailboxEvent.FromString(msg.data).change, headers))
            if msg.metadata.num_pending == 0:
                return out
    finally:
        await sub.unsubscribe()


async def subject_count(js: JetStreamContext, user: str) -> int:
    subject = streams.events_subject(user)
    info = await js.stream_info(streams.EVENTS.name, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def test_list_changes(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    start = await highest(mesh, alice)
    m = await append(mesh, alice, 1)
    label = (await mesh.stub.CreateLabel(pb.CreateLabelRequest(parent="users/me", name="Work"),
                                         metadata=mesh.md(alice))).label
    await modify(mesh, alice, [m.id], add_label_ids=[label.id])
    await modify(mesh, alice, [m.id], unread=False, starred=True)
    await modify(mesh, alice, [m.id], remove_label_ids=[label.id, "INBOX"])
    await mesh.stub.TrashMessage(pb.TrashMessageRequest(name=f"users/me/messages/{m.id}"), metadata=mesh.md(alice))
    await mesh.stub.DeleteMessage(pb.DeleteMessageRequest(name=f"users/me/messages/{m.id}"), metadata=mesh.md(alice))

    changes = await all_changes(mesh, alice, start)
    assert [c.type for c in changes] == [
        T.CHANGE_TYPE_MESSAGE_ADDED, T.CHANGE_TYPE_LABEL_CREATED, T.CHANGE_TYPE_LABELS_CHANGED,
        T.CHANGE_TYPE_LABELS_CHANGED, T.CHANGE_TYPE_LABELS_CHANGED, T.CHANGE_TYPE_LABELS_CHANGED,
        T.CHANGE_TYPE_MESSAGE_DELETED]
    assert [c.modseq for c in changes] == list(range(start + 1, start + 8))
    assert all(c.user_id == alice for c in changes)
    added, created, lab, flags, removed, trashed, deleted = changes
    assert added.message_id == m.id and added.thread_id == m.thread_id and list(added.label_ids) == ["INBOX"]
    assert added.unread and added.uids["INBOX"] >= 1
    assert created.label_id == label.id
    assert list(lab.added_label_ids) == [label.id] and not lab.removed_label_ids
    assert sorted(lab.label_ids) == sorted(["INBOX", label.id])
    # starring adds the STARRED label; the read flag rides along
    assert list(flags.added_label_ids) == ["STARRED"] and not flags.unread and flags.starred
    assert sorted(removed.removed_label_ids) == sorted(["INBOX", label.id])
    assert list(trashed.added_label_ids) == ["TRASH"]
    assert deleted.message_id == m.id and "TRASH" in deleted.removed_label_ids
    # history ids follow the changelog
    r = await mesh.stub.ListChanges(pb.ListChangesRequest(parent="users/me", since_modseq=start),
                                    metadata=mesh.md(alice))
    assert r.highest_modseq == start + 7 and not r.has_more

    # paging: has_more until the end, nothing lost or repeated
    for i in range(2, 9):
        await append(mesh, alice, i)
    everything = await all_changes(mesh, alice, 0)
    paged = await all_changes(mesh, alice, 0, page=3)
    assert [c.modseq for c in paged] == [c.modseq for c in everything]
    assert [c.modseq for c in everything] == list(range(1, len(everything) + 1))
    first = await mesh.stub.ListChanges(pb.ListChangesRequest(parent="users/me", page_size=3), metadata=mesh.md(alice))
    assert first.has_more and len(first.changes) == 3
    # changes are per user
    assert await all_changes(mesh, users["bob"]) == []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.ListChanges(pb.ListChangesRequest(parent=f"users/{alice}"), metadata=mesh.md(users["bob"]))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_watch_changes(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    m1 = await append(mesh, alice, 1)
    m2 = await append(mesh, alice, 2)
    since = (await all_changes(mesh, alice))[0].modseq  # skip the first
    call = mesh.stub.WatchChanges(pb.WatchChangesRequest(parent="users/me", since_modseq=since),
                                  metadata=mesh.md(alice))
    try:
        first = await asyncio.wait_for(call.read(), 2)
        assert first.change.message_id == m2.id and first.change.modseq == since + 1
        for i in range(3):
            t0 = time.monotonic()
            await modify(mesh, alice, [m1.id], unread=bool(i % 2))
            got = await asyncio.wait_for(call.read(), 2)
            assert got.change.message_id == m1.id
            assert got.change.type == T.CHANGE_TYPE_FLAGS_CHANGED
            assert got.change.modseq == since + 2 + i
            assert time.monotonic() - t0 < 1.0
        # a change of another user does not wake this stream with foreign data
        await append(mesh, users["bob"], 9)
        m3 = await append(mesh, alice, 3)
        got = await asyncio.wait_for(call.read(), 2)
        assert got.change.message_id == m3.id and got.change.user_id == alice
    finally:
        call.cancel()


async def test_relay_publishes_every_change(mesh: Mesh, users: dict[str, str]) -> None:
    alice, bob = users["alice"], users["bob"]
    msgs = [await append(mesh, alice, i) for i in range(5)]
    await modify(mesh, alice, [m.id for m in msgs], unread=False)
    await mesh.stub.TrashMessage(pb.TrashMessageRequest(name=f"users/me/messages/{msgs[0].id}"),
                                 metadata=mesh.md(alice))
    await append(mesh, bob, 99)
    # a call made inside a trace: its change, and the EVENTS message, carry that trace
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traced = await mesh.stub.AppendMessage(
        pb.AppendMessageRequest(parent="users/me", raw=make_raw(50), label_ids=["INBOX"]),
        metadata=(*mesh.md(alice), ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")))
    changes = await all_changes(mesh, alice)
    got = await events(mesh.js, alice, len(changes))
    assert [msg_id for msg_id, _, _ in got] == [f"{alice}:{c.modseq}" for c in changes]
    assert [c for _, c, _ in got] == changes
    for _, c, headers in got:
        if c.traceparent:
            assert headers.get("traceparent") == c.traceparent
    _, traced_change, traced_headers = got[-1]
    assert traced_change.message_id == traced.message.id
    assert traced_change.traceparent.split("-")[1] == trace_id
    assert traced_headers["traceparent"].split("-")[1] == trace_id
    bob_events = await events(mesh.js, bob, 1)
    assert [c.user_id for _, c, _ in bob_events] == [bob]


async def test_relay_serves_many_users_per_pass_and_goes_idle(mesh: Mesh) -> None:
    """Changes of many users committed together are all published, and the relay stores every
    user's position and clears every user's pending mark (it stays idle afterwards)."""
    domain = "many.test"
    ids = await mesh.admin_setup(domain, tuple(f"u{k}" for k in range(8)))
    users = list(ids.values())
    await asyncio.gather(*(append(mesh, u, i) for i in range(3) for u in users))
    for u in users:
        changes = await all_changes(mesh, u)
        got = await events(mesh.js, u, len(changes))
        assert [msg_id for msg_id, _, _ in got] == [f"{u}:{c.modseq}" for c in changes]
    db = mesh.ctx.components["mailbox"].db

    def relay_state(tr: Transaction) -> list[tuple[bool, int, int]]:
        return [(tr.get(keys.g("dirty", u)) is not None, decode_counter(tr.get(keys.g("relay", u))),
                 decode_counter(tr.get(keys.u(u, "ctr", "modseq")))) for u in users]

    async def idle() -> bool:
        return all(not dirty and pos == top for dirty, pos, top in await db.run(relay_state, readonly=True))
    await eventually(idle, "every user's relay position stored and pending mark cleared")


async def _reset_relay(kv_path: str, user: str) -> int:
    db = open_database(kv_path)
    try:
        def reset(tr: Transaction) -> int:
            old = decode_counter(tr.get(keys.g("relay", user)))
            tr.set(keys.g("relay", user), encode_counter(0))
            tr.set(keys.g("dirty", user), b"")  # as a crash between publish and position update leaves it
            return old
        return await db.run(reset)
    finally:
        await db.close()


async def test_relay_restart_republishes_without_duplicates(tmp_path: Path, nats_url: str) -> None:
    mesh = await start_mesh(tmp_path, nats_url)
    try:
        ids = await mesh.admin_setup()
        alice = ids["alice"]
        for i in range(6):
            await append(mesh, alice, i)
        changes = await all_changes(mesh, alice)
        await events(mesh.js, alice, len(changes))
        before = await subject_count(mesh.js, alice)
        assert before == len(changes)
        settings = mesh.settings
    finally:
        await stop_mesh(mesh)

    old_pos = await _reset_relay(settings.resolved_kv_path(), alice)
    assert old_pos == len(changes)

    mesh = await start_mesh(tmp_path, nats_url)
    try:
        # the relay republishes everything from position 0, in order; JetStream drops the
        # duplicates. Once a new change is out, everything before it was (re)published.
        extra = await append(mesh, alice, 100)
        got = await events(mesh.js, alice, len(changes) + 1)
        after = await all_changes(mesh, alice)
        assert got[-1][1].message_id == extra.id
        assert [msg_id for msg_id, _, _ in got] == [f"{alice}:{c.modseq}" for c in after]
        assert [c for _, c, _ in got] == after
        assert await subject_count(mesh.js, alice) == len(after) == before + 1
    finally:
        await stop_mesh(mesh)


async def test_changelog_retention(tmp_path: Path, nats_url: str) -> None:
    mesh = await start_mesh(tmp_path, nats_url, changelog_retention=10)
    try:
        alice = (await mesh.admin_setup())["alice"]
        msgs = [await append(mesh, alice, i) for i in range(15)]
        for m in msgs:
            await modify(mesh, alice, [m.id], unread=False)
        top = await highest(mesh, alice)
        assert top == 30

        async def trimmed() -> bool:
            # fully trimmed: everything below modseq top - 10 is gone
            try:
                await mesh.stub.ListChanges(pb.ListChangesRequest(parent="users/me", since_modseq=top - 12),
                                            metadata=mesh.md(alice))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                return True
            return False
        await eventually(trimmed, "the relay to trim the changelog")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.stub.ListChanges(pb.ListChangesRequest(parent="users/me", since_modseq=5),
                                        metadata=mesh.md(alice))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no longer kept" in (err.value.details() or "")
        assert "resynchronize" in (err.value.details() or "")
        # the newest `retention` changes (and the one before) are still there, none missing
        recent = await all_changes(mesh, alice, top - 11)
        assert [c.modseq for c in recent] == list(range(top - 10, top + 1))
        recent = await all_changes(mesh, alice, top - 3)
        assert [c.modseq for c in recent] == list(range(top - 2, top + 1))
        # WatchChanges from a trimmed position fails the same way
        call = mesh.stub.WatchChanges(pb.WatchChangesRequest(parent="users/me"), metadata=mesh.md(alice))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 5)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # every change still went out on EVENTS before it was trimmed
        got = await events(mesh.js, alice, top)
        assert [c.modseq for _, c, _ in got] == list(range(1, top + 1))
    finally:
        await stop_mesh(mesh)
