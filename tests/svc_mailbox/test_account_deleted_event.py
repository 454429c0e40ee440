"""Deleting an account tells every EVENTS consumer: the last step of the deletion leaves an
account-deleted MailboxEvent in the outbox, in the same transaction, and the relay publishes it
on the user's subject (Nats-Msg-Id "<user>:deleted") and clears it — also when the deletion was
interrupted by a crash and finished after a restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from mailmesh.v1 import events_pb2
from mailmesh.v1 import mailbox_service_pb2 as pb
from nats.js import JetStreamContext
from nats.js import api as js_api

from mailmesh_common import streams
from svc_mailbox import jobs, keys
from tests.svc_mailbox.conftest import Mesh, start_mesh, stop_mesh
from tests.svc_mailbox.test_account_jobs import fill

WAIT_S = 30.0


async def user_events(js: JetStreamContext, user: str, until_deleted: bool = True,
                      within: float = WAIT_S) -> list[tuple[str, events_pb2.MailboxEvent]]:
    """(Nats-Msg-Id, event) of every EVENTS message of `user`; with `until_deleted`, waits
    (bounded) until the account-deleted event is stored."""
    subject = streams.events_subject(user)
    deadline = time.monotonic() + within
    while True:
        out: list[tuple[str, events_pb2.MailboxEvent]] = []
        info = await js.stream_info(streams.EVENTS.name, subjects_filter=subject)
        stored = (info.state.subjects or {}).get(subject, 0)
        if stored:
            sub = await js.subscribe(subject, ordered_consumer=True,
                                     config=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL))
            try:
                for _ in range(stored):
                    msg = await sub.next_msg(timeout=5)
                    out.append(((msg.headers or {}).get("Nats-Msg-Id", ""), events_pb2.MailboxEvent.FromString(msg.data)))
            finally:
                await sub.unsubscribe()
        if not until_deleted or any(e.HasField("account_deleted") for _, e in out):
            return out
        assert time.monotonic() < deadline, f"no account-deleted event for {user} within {within}s"
        await asyncio.sleep(0.05)


async def outbox(mesh: Mesh) -> list[bytes]:
    db = mesh.ctx.components["mailbox"].db
    b, e = keys.g_range("gone")
    return [k for k, _ in await db.run(lambda tr: tr.get_range(b, e, limit=100), readonly=True)]


async def test_deleting_an_account_publishes_its_last_event(mesh: Mesh, users: dict[str, str]) -> None:
    alice, bob = users["alice"], users["bob"]
    await fill(mesh, alice, 5, "e")
    await fill(mesh, bob, 2, "f")
    highest = (await mesh.stub.GetAccount(pb.GetAccountRequest(name=f"users/{alice}"),
                                          metadata=mesh.md())).account.highest_modseq
    await mesh.stub.DeleteAccount(pb.DeleteAccountRequest(name=f"users/{alice}"), metadata=mesh.md())
    got = await user_events(mesh.js, alice)
    deleted = [(mid, e) for mid, e in got if e.HasField("account_deleted")]
    assert len(deleted) == 1
    msg_id, ev = deleted[0]
    assert msg_id == f"{alice}:deleted"
    assert ev.account_deleted.user_id == alice and ev.account_deleted.last_modseq == highest
    assert ev.account_deleted.time.seconds > 0 and not ev.HasField("change")
    assert got[-1][1].HasField("account_deleted")  # nothing of alice's follows it
    # the outbox entry is cleared once published; bob got no such event
    for _ in range(int(WAIT_S / 0.05)):
        if not await outbox(mesh):
            break
        await asyncio.sleep(0.05)
    assert await outbox(mesh) == []
    db = mesh.ctx.components["mailbox"].db
    for family in ("relay", "dirty", "gone"):  # nothing of alice's is left for the relay
        assert await db.run(lambda tr, f=family: tr.get(keys.g(f, alice)), readonly=True) is None
    assert not any(e.HasField("account_deleted") for _, e in await user_events(mesh.js, bob, until_deleted=False))


async def test_an_interrupted_deletion_still_publishes_the_event(tmp_path: Path, nats_url: str) -> None:
    mesh = await start_mesh(tmp_path, nats_url)
    try:
        alice = (await mesh.admin_setup())["alice"]
        await fill(mesh, alice, jobs.DELETE_BATCH + 5, "g")
        mb = mesh.ctx.components["mailbox"]
        job = await mb.write(alice, jobs.start_delete_account)
        await mb.write(alice, lambda m: jobs.step(m, job))  # one batch, then "crash"
        assert not any(e.HasField("account_deleted") for _, e in await user_events(mesh.js, alice, until_deleted=False))
    finally:
        await stop_mesh(mesh)
    mesh = await start_mesh(tmp_path, nats_url)  # resumes the job, then relays the event
    try:
        got = await user_events(mesh.js, alice)
        assert [mid for mid, e in got if e.HasField("account_deleted")] == [f"{alice}:deleted"]
    finally:
        await stop_mesh(mesh)
