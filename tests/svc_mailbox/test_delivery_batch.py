"""INBOUND delivery in batches: a backlog is delivered exactly once (several transactions'
worth, a reply threading with a parent delivered in the same transaction), the ParsedSummary
ingest attaches is what the record is built from (no second parse), and one bad message or a
deleted recipient in a batch does not hold up the others."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
from mailmesh.v1 import events_pb2, types_pb2
from mailmesh.v1 import mailbox_service_pb2 as pb
from nats.js import JetStreamContext

from mailmesh_common import streams
from mailmesh_common.blobstore import BlobStore
from svc_mailbox.delivery import MAX_DELIVERIES_PER_TXN
from tests.svc_mailbox.conftest import Mesh, start_mesh, stop_mesh
from tests.svc_mailbox.test_delivery import blobs, eventually, listing, make_raw, publish, wait_idle


async def backlog(tmp_path: Path, nats_url: str, fill: Callable[[JetStreamContext, BlobStore], Awaitable[None]], *,
                  delete: str = "") -> tuple[Mesh, dict[str, str]]:
    """A mesh whose consumer finds what `fill(js, store)` published while svc_mailbox was down
    (after the account `delete`, if given, was deleted)."""
    mesh = await start_mesh(tmp_path, nats_url)
    try:
        ids = await mesh.admin_setup()
        store = blobs(mesh)
        if delete:
            await mesh.stub.DeleteAccount(pb.DeleteAccountRequest(name=f"users/{ids[delete]}"), metadata=mesh.md())
    finally:
        await stop_mesh(mesh)
    nc = await nats.connect(nats_url)
    try:
        await fill(nc.jetstream(), store)
    finally:
        await nc.close()
    return await start_mesh(tmp_path, nats_url), ids


async def test_backlog_delivered_once_across_transactions_with_threading(tmp_path: Path, nats_url: str) -> None:
    n = MAX_DELIVERIES_PER_TXN  # to two users: two transactions' worth and more

    async def fill(js: JetStreamContext, store: BlobStore) -> None:
        for i in range(n):
            await publish(js, await store.put(make_raw(i)), f"b-{i}",
                          ["alice@example.com", "bob@example.com"])
        reply = (b"From: Bob <bob@example.com>\r\nTo: carol@remote.test\r\nSubject: Re: Inbound 0\r\n"
                 b"Message-ID: <reply-0@example.com>\r\nIn-Reply-To: <in-0@remote.test>\r\n"
                 b"References: <in-0@remote.test>\r\n\r\nagreed\r\n")
        await publish(js, await store.put(reply), "b-reply", ["alice@example.com"])
        # a producer retrying one of them under another Nats-Msg-Id
        await publish(js, await store.put(make_raw(3)), "b-3", ["alice@example.com", "bob@example.com"],
                      msg_id="b-3-retry")

    mesh, ids = await backlog(tmp_path, nats_url, fill)
    try:
        async def all_in() -> bool:
            return (len(await listing(mesh, ids["alice"], "INBOX")) >= n + 1
                    and len(await listing(mesh, ids["bob"], "INBOX")) >= n)
        await eventually(all_in, "the backlog delivered", within=60)
        await wait_idle(mesh.js)
        alice = await listing(mesh, ids["alice"], "INBOX")
        bob = await listing(mesh, ids["bob"], "INBOX")
        assert sorted(m.subject for m in bob) == sorted(f"Inbound {i}" for i in range(n))
        assert len(alice) == n + 1, "exactly once, the retry included"
        parent = next(m for m in alice if m.subject == "Inbound 0")
        reply = next(m for m in alice if m.subject == "Re: Inbound 0")
        assert reply.thread_id == parent.thread_id
        assert (await mesh.js.stream_info(streams.INBOUND.name)).state.messages == 0
    finally:
        await stop_mesh(mesh)


def summary(subject: str) -> events_pb2.ParsedSummary:
    s = events_pb2.ParsedSummary(subject=subject, message_id="summary-1@remote.test", snippet="from the summary",
                                 in_reply_to=["parent-9@remote.test"], references=["parent-9@remote.test"])
    getattr(s, "from").add(name="Carol", email="carol@remote.test")
    s.to.add(name="", email="alice@example.com")
    s.date.FromSeconds(1_795_000_000)
    return s


async def test_record_is_built_from_the_ingest_summary(mesh: Mesh, users: dict[str, str]) -> None:
    ref = await blobs(mesh).put(make_raw(1))  # its own headers say "Inbound 1"
    msg = events_pb2.InboundMessage(ingest_id="sum-1", rcpt_to=["alice@example.com"], blob_ref=ref, size=123,
                                    source=events_pb2.MESSAGE_SOURCE_SMTP, parsed=summary("Parsed at ingest"))
    await streams.publish(mesh.js, streams.inbound_subject("sum-1"), msg, msg_id="sum-1")

    async def there() -> bool:
        return len(await listing(mesh, users["alice"], "INBOX")) == 1
    await eventually(there, "the delivery")
    got = (await listing(mesh, users["alice"], "INBOX"))[0]
    assert got.subject == "Parsed at ingest" and got.snippet == "from the summary"
    assert got.message_id_header == "summary-1@remote.test"
    assert [a.email for a in getattr(got, "from")] == ["carol@remote.test"]
    assert got.date.seconds == 1_795_000_000 and got.size_estimate == 123
    assert list(got.references) == ["parent-9@remote.test"]
    # the full format still reads the blob: its bodies are the message's own
    full = await mesh.stub.GetMessage(pb.GetMessageRequest(
        name=f"users/{users['alice']}/messages/{got.id}", format=types_pb2.MESSAGE_FORMAT_FULL),
        metadata=mesh.md(users["alice"]))
    assert "body 1" in full.message.text_body


async def test_bad_message_and_deleted_recipient_do_not_hold_up_the_batch(tmp_path: Path, nats_url: str) -> None:
    async def fill(js: JetStreamContext, store: BlobStore) -> None:
        for i in range(5):
            await publish(js, await store.put(make_raw(i)), f"ok-{i}", ["alice@example.com"])
        # an ingest id over the 200-character limit: refused by delivery, kept for retry
        await publish(js, await store.put(make_raw(99)), "x" * 201, ["alice@example.com"],
                      msg_id="too-long")
        for i in range(5, 10):
            await publish(js, await store.put(make_raw(i)), f"ok-{i}", ["alice@example.com", "bob@example.com"])

    mesh, ids = await backlog(tmp_path, nats_url, fill, delete="bob")
    try:
        async def all_ok() -> bool:
            return len(await listing(mesh, ids["alice"], "INBOX")) >= 10
        await eventually(all_ok, "the good messages delivered", within=30)
        subjects = sorted(m.subject for m in await listing(mesh, ids["alice"], "INBOX"))
        assert subjects == sorted(f"Inbound {i}" for i in range(10)), "the bad one is not delivered"
        info = await mesh.js.consumer_info(streams.INBOUND.name, "svc-mailbox-delivery")
        assert info.num_pending + info.num_ack_pending >= 1, "the bad one waits for a retry, not acked"
    finally:
        await stop_mesh(mesh)
