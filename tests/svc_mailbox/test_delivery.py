"""Delivery through JetStream INBOUND into INBOX or SPAM: exactly once per recipient (dedup by
ingest id), unknown recipients skipped, one shared blob, acks after commit, and delivery of
what was published while the service was down. Also the DeliverMessage RPC's idempotency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import nats
import pytest
from mailmesh.v1 import events_pb2, types_pb2
from mailmesh.v1 import mailbox_service_pb2 as pb
from nats.js import JetStreamContext

from mailmesh_common import streams
from mailmesh_common.blobstore import BlobStore
from svc_mailbox.delivery import DURABLE
from tests.svc_mailbox.conftest import Mesh, start_mesh, stop_mesh

WAIT_S = 10.0


def make_raw(n: int | str, subject: str = "Inbound") -> bytes:
    return (f"From: Carol <carol@remote.test>\r\nTo: alice@example.com, bob@example.com\r\n"
            f"Subject: {subject} {n}\r\nMessage-ID: <in-{n}@remote.test>\r\n"
            f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nbody {n}\r\n").encode()


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = WAIT_S) -> None:
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


async def listing(mesh: Mesh, user: str, label: str) -> list[types_pb2.Message]:
    r = await mesh.stub.ListMessages(pb.ListMessagesRequest(parent="users/me", label_id=label, page_size=500),
                                     metadata=mesh.md(user))
    return list(r.messages)


async def consumer_idle(js: JetStreamContext) -> bool:
    info = await js.consumer_info(streams.INBOUND.name, DURABLE)
    return info.num_ack_pending == 0 and info.num_pending == 0


async def wait_idle(js: JetStreamContext) -> None:
    async def idle() -> bool:
        return await consumer_idle(js)
    await eventually(idle, "the INBOUND consumer to ack everything")


async def publish(mesh: Mesh | JetStreamContext, blob_ref: str, ingest_id: str, rcpts: list[str], *,
                  msg_id: str | None = None, spam: events_pb2.SpamVerdict | None = None,
                  quarantine: bool = False) -> None:
    js = mesh.js if isinstance(mesh, Mesh) else mesh
    msg = events_pb2.InboundMessage(ingest_id=ingest_id, rcpt_to=rcpts, blob_ref=blob_ref,
                                    mail_from="carol@remote.test", source=events_pb2.MESSAGE_SOURCE_SMTP,
                                    quarantine=quarantine)
    if spam is not None:
        msg.spam.CopyFrom(spam)
    await streams.publish(js, streams.inbound_subject(ingest_id), msg, msg_id=msg_id or ingest_id)


def blobs(mesh: Mesh) -> BlobStore:
    return BlobStore(mesh.settings.data_dir / "blobs")


async def test_inbound_to_inbox_exactly_once(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    ref = await blobs(mesh).put(make_raw(1))
    await publish(mesh, ref, "ing-1", ["alice@example.com"])

    async def arrived() -> bool:
        return len(await listing(mesh, alice, "INBOX")) >= 1
    await eventually(arrived, "delivery to INBOX")
    await wait_idle(mesh.js)
    inbox = await listing(mesh, alice, "INBOX")
    assert [m.subject for m in inbox] == ["Inbound 1"]
    assert inbox[0].unread and inbox[0].blob_ref == ref
    assert await listing(mesh, alice, "SPAM") == []
    # the same Nats-Msg-Id again is dropped by JetStream's duplicate window
    await publish(mesh, ref, "ing-1", ["alice@example.com"])
    # a redelivered message (same ingest id, new Nats-Msg-Id) is deduplicated by the mailbox
    await publish(mesh, ref, "ing-1", ["alice@example.com"], msg_id="ing-1-retry")
    await wait_idle(mesh.js)
    assert len(await listing(mesh, alice, "INBOX")) == 1
    labels = await mesh.stub.GetLabel(pb.GetLabelRequest(name="users/me/labels/INBOX"), metadata=mesh.md(alice))
    assert (labels.label.messages_total, labels.label.messages_unread) == (1, 1)
    # INBOUND is a work queue: nothing is left in it once acked
    info = await mesh.js.stream_info(streams.INBOUND.name)
    assert info.state.messages == 0


async def test_spam_and_quarantine_go_to_spam(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    store = blobs(mesh)
    await publish(mesh, await store.put(make_raw(2)), "ing-spam", ["alice@example.com"],
                  spam=events_pb2.SpamVerdict(score=9.5, is_spam=True))
    await publish(mesh, await store.put(make_raw(3)), "ing-quar", ["alice@example.com"], quarantine=True,
                  spam=events_pb2.SpamVerdict(score=0.1, is_spam=False))
    await publish(mesh, await store.put(make_raw(4)), "ing-ham", ["alice@example.com"],
                  spam=events_pb2.SpamVerdict(score=1.0, is_spam=False))

    async def all_three() -> bool:
        return len(await listing(mesh, alice, "SPAM")) + len(await listing(mesh, alice, "INBOX")) == 3
    await eventually(all_three, "three deliveries")
    spam = await listing(mesh, alice, "SPAM")
    assert sorted(m.subject for m in spam) == ["Inbound 2", "Inbound 3"]
    assert {m.subject: m.spam_score for m in spam}["Inbound 2"] == pytest.approx(9.5)
    assert [m.subject for m in await listing(mesh, alice, "INBOX")] == ["Inbound 4"]
    # spam is not in All Mail
    assert [m.subject for m in await listing(mesh, alice, "")] == ["Inbound 4"]
    await wait_idle(mesh.js)


async def test_multi_recipient_shared_blob_unknown_skipped(mesh: Mesh, users: dict[str, str]) -> None:
    alice, bob = users["alice"], users["bob"]
    store = blobs(mesh)
    ref = await store.put(make_raw(5))
    # unknown, foreign and malformed recipients first: they must not hold up the real ones
    await publish(mesh, ref, "ing-multi", ["nobody@example.com", "someone@elsewhere.test", "not an address",
                                           "alice@example.com", "Bob@Example.com", "alice@example.com"])

    async def both() -> bool:
        return len(await listing(mesh, alice, "INBOX")) == 1 and len(await listing(mesh, bob, "INBOX")) == 1
    await eventually(both, "delivery to alice and bob")
    await wait_idle(mesh.js)
    a, b = (await listing(mesh, alice, "INBOX"))[0], (await listing(mesh, bob, "INBOX"))[0]
    assert a.blob_ref == b.blob_ref == ref
    assert len(await listing(mesh, alice, "INBOX")) == 1  # listed twice in rcpt_to, delivered once
    # one blob, referenced twice: deleting alice's copy keeps bob's readable
    await mesh.stub.DeleteMessage(pb.DeleteMessageRequest(name=f"users/me/messages/{a.id}"), metadata=mesh.md(alice))
    raw = await mesh.stub.GetMessage(pb.GetMessageRequest(name=f"users/me/messages/{b.id}",
                                                          format=types_pb2.MESSAGE_FORMAT_RAW), metadata=mesh.md(bob))
    assert raw.message.raw == make_raw(5)
    mailbox = mesh.ctx.components["mailbox"]
    await mailbox.collect_blobs(grace_s=0)
    assert store.path(ref).exists()
    await mesh.stub.DeleteMessage(pb.DeleteMessageRequest(name=f"users/me/messages/{b.id}"), metadata=mesh.md(bob))
    await mailbox.collect_blobs(grace_s=0)
    assert not store.path(ref).exists()


async def test_missing_blob_does_not_block_the_queue(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    missing = await blobs(mesh).put(b"will be removed")
    blobs(mesh).path(missing).unlink()
    await publish(mesh, missing, "ing-missing", ["alice@example.com"])
    await publish(mesh, await blobs(mesh).put(make_raw(6)), "ing-after", ["alice@example.com"])

    async def arrived() -> bool:
        return len(await listing(mesh, alice, "INBOX")) == 1
    await eventually(arrived, "the message after the broken one")
    await wait_idle(mesh.js)
    assert [m.subject for m in await listing(mesh, alice, "INBOX")] == ["Inbound 6"]


async def test_empty_ingest_id_still_delivered_once(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    ref = await blobs(mesh).put(make_raw(7))
    msg = events_pb2.InboundMessage(rcpt_to=["alice@example.com"], blob_ref=ref)
    await streams.publish(mesh.js, streams.inbound_subject("x"), msg, msg_id="no-ingest-id")

    async def arrived() -> bool:
        return len(await listing(mesh, alice, "INBOX")) == 1
    await eventually(arrived, "delivery without an ingest id")
    await wait_idle(mesh.js)
    assert len(await listing(mesh, alice, "INBOX")) == 1


async def test_deliver_message_rpc_is_idempotent(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    ref = await blobs(mesh).put(make_raw(8))
    req = pb.DeliverMessageRequest(parent=f"users/{alice}", ingest_id="rpc-1", blob_ref=ref,
                                   target=pb.DELIVERY_TARGET_INBOX, spam_score=0.5)
    req.received_time.FromSeconds(1_700_000_000)
    first = await mesh.stub.DeliverMessage(req, metadata=mesh.md())
    second = await mesh.stub.DeliverMessage(req, metadata=mesh.md())
    assert not first.duplicate and second.duplicate
    assert first.message.id == second.message.id
    assert first.message.internal_date.seconds == 1_700_000_000
    assert len(await listing(mesh, alice, "INBOX")) == 1
    # the same ingest id for another user is a separate delivery
    other = await mesh.stub.DeliverMessage(pb.DeliverMessageRequest(parent=f"users/{users['bob']}",
                                                                    ingest_id="rpc-1", blob_ref=ref),
                                           metadata=mesh.md())
    assert not other.duplicate
    # only the mesh may deliver
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.DeliverMessage(req, metadata=mesh.md(alice))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # an unknown blob is NOT_FOUND, and an unknown user too
    bad = pb.DeliverMessageRequest(parent=f"users/{alice}", ingest_id="rpc-2", blob_ref="0" * 64)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.DeliverMessage(bad, metadata=mesh.md())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_published_while_down_delivered_after_restart(tmp_path: Path, nats_url: str) -> None:
    mesh = await start_mesh(tmp_path, nats_url)
    try:
        ids = await mesh.admin_setup()
        store = blobs(mesh)
        ref0 = await store.put(make_raw(10))
        await publish(mesh, ref0, "ing-before", ["alice@example.com"])

        async def first() -> bool:
            return len(await listing(mesh, ids["alice"], "INBOX")) == 1
        await eventually(first, "delivery before the restart")
        await wait_idle(mesh.js)
    finally:
        await stop_mesh(mesh)

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for i in range(11, 16):
            await publish(js, await store.put(make_raw(i)), f"ing-down-{i}", ["alice@example.com", "bob@example.com"])
        # a retry of one of them, as a producer that crashed after publishing would send
        await publish(js, await store.put(make_raw(11)), "ing-down-11", ["alice@example.com", "bob@example.com"],
                      msg_id="ing-down-11-retry")
        assert (await js.stream_info(streams.INBOUND.name)).state.messages == 6
    finally:
        await nc.close()

    mesh = await start_mesh(tmp_path, nats_url)
    try:
        async def all_in() -> bool:
            return (len(await listing(mesh, ids["alice"], "INBOX")) >= 6
                    and len(await listing(mesh, ids["bob"], "INBOX")) >= 5)
        await eventually(all_in, "delivery after the restart")
        await wait_idle(mesh.js)
        subjects = sorted(m.subject for m in await listing(mesh, ids["alice"], "INBOX"))
        assert subjects == sorted(f"Inbound {i}" for i in range(10, 16))
        assert len(await listing(mesh, ids["bob"], "INBOX")) == 5
        assert (await mesh.js.stream_info(streams.INBOUND.name)).state.messages == 0
    finally:
        await stop_mesh(mesh)
