"""Spam feedback end to end: a user adding or removing the SPAM label in a real svc_mailbox
reaches svc_ingest over JetStream EVENTS, and the filter trains on that message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from mailmesh.v1 import events_pb2, types_pb2
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc

from mailmesh_common import grpcclient
from mailmesh_common.kv import open_database
from svc_ingest.spam.bayes import Counts
from svc_ingest.spam.bytemodel import grams
from svc_ingest.spam.feedback import SpamFeedback, feedback_label, strip_ingest_headers
from svc_ingest.spam.filter import SpamFilter
from tests.svc_mailbox.conftest import Mesh, mesh, nats_url, users  # noqa: F401

WAIT_S = 10.0


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_S}s waiting for {what}")
        await asyncio.sleep(0.05)


def raw_message(n: int) -> bytes:
    return (f"From: Promo <promo{n}@offers.test>\r\nTo: alice@example.com\r\n"
            f"Subject: cheap pills offer {n}\r\nDate: Mon, 1 Jul 2002 10:00:00 +0000\r\n"
            f"Message-ID: <promo-{n}@offers.test>\r\n\r\nbuy cheap pills now, offer {n}\r\n").encode()


class Running:
    def __init__(self, flt: SpamFilter, feedback: SpamFeedback) -> None:
        self.filter = flt
        self.feedback = feedback

    async def counts(self, user: str = "") -> Counts:
        return await self.filter.counts(user)

    async def wait_counts(self, spam: int, ham: int, user: str = "") -> None:
        async def check() -> bool:
            return await self.counts(user) == Counts(spam, ham)

        await eventually(check, f"model counts spam={spam} ham={ham} (user {user!r})")

    async def wait_trained(self, n: int) -> None:
        """Until the consumer finished n events (the byte model learns after the counts)."""
        async def check() -> bool:
            return self.feedback.trained >= n

        await eventually(check, f"{n} feedback events handled")


@pytest.fixture
async def running(mesh: Mesh, tmp_path: Path) -> AsyncIterator[Running]:  # noqa: F811
    db = open_database(tmp_path / "spam.db")
    channel = grpcclient.channel(mesh.settings.addr("mailbox"), mesh.settings)
    flt = SpamFilter(db)
    feedback = SpamFeedback(flt, mesh.js, lambda: pb_grpc.MailboxServiceStub(channel))
    stop = asyncio.Event()
    task = asyncio.create_task(feedback.run(stop))
    try:
        yield Running(flt, feedback)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await channel.close()
        await db.close()


async def append(mesh: Mesh, user: str, n: int, labels: tuple[str, ...] = ("INBOX",)) -> str:  # noqa: F811
    r = await mesh.stub.AppendMessage(pb.AppendMessageRequest(parent="users/me", raw=raw_message(n),
                                                              label_ids=list(labels), unread=True),
                                      metadata=mesh.md(user))
    return r.message.id


async def modify(mesh: Mesh, user: str, msg_id: str, add: tuple[str, ...] = (),  # noqa: F811
                 remove: tuple[str, ...] = ()) -> None:
    await mesh.stub.BatchModifyMessages(pb.BatchModifyMessagesRequest(
        parent="users/me", ids=[msg_id], add_label_ids=list(add), remove_label_ids=list(remove)),
        metadata=mesh.md(user))


async def test_marking_spam_and_not_spam_trains_the_filter(
        mesh: Mesh, users: dict[str, str], running: Running) -> None:  # noqa: F811
    alice = users["alice"]
    msg = await append(mesh, alice, 1)
    await modify(mesh, alice, msg, add=("SPAM",), remove=("INBOX",))
    await running.wait_counts(1, 0)
    await running.wait_counts(1, 0, alice)  # and alice's own adjustments
    tokens = (await running.filter.analyze(raw_message(1))).tokens
    assert (await running.filter.model.token_counts(["pills"]))["pills"] == (1, 0)
    assert set(await running.filter.model.token_counts(tokens)) == set(tokens)
    # the byte model learnt it too: globally and in alice's adjustments
    buckets = grams(raw_message(1))
    await running.wait_trained(1)
    as_spam = (await running.filter.bytes.snapshot()).logit(buckets)
    alice_spam = await running.filter.bytes.user_logit(alice, buckets)
    assert as_spam > 0 and alice_spam > 0

    # "not spam": the same message moves from spam to ham, globally and for alice
    await modify(mesh, alice, msg, add=("INBOX",), remove=("SPAM",))
    await running.wait_counts(0, 1)
    await running.wait_counts(0, 1, alice)
    await running.wait_trained(2)
    assert (await running.filter.model.token_counts(["pills"]))["pills"] == (0, 1)
    assert await running.counts(users["bob"]) == Counts(0, 0)
    assert (await running.filter.bytes.snapshot()).logit(buckets) < as_spam
    assert await running.filter.bytes.user_logit(alice, buckets) < alice_spam
    assert await running.filter.bytes.user_logit(users["bob"], buckets) == 0.0


async def test_deliveries_deletions_and_trash_are_not_feedback(
        mesh: Mesh, users: dict[str, str], running: Running) -> None:  # noqa: F811
    alice = users["alice"]
    delivered = await append(mesh, alice, 2, labels=("SPAM",))  # the filter's own verdict
    await modify(mesh, alice, delivered, add=("TRASH",), remove=("SPAM",))  # deleting spam
    marked = await append(mesh, alice, 3)
    await modify(mesh, alice, marked, add=("SPAM",), remove=("INBOX",))
    # events of one user arrive in order: once the last one is learnt, the others were seen
    await running.wait_counts(1, 0)

    async def handled() -> bool:  # the event is done once the byte model learnt it too
        return running.feedback.trained == 1

    await eventually(handled, "the feedback consumer to finish the event")
    assert running.feedback.trained == 1


def test_feedback_label_reads_only_users_label_changes() -> None:
    T = types_pb2
    labels = T.CHANGE_TYPE_LABELS_CHANGED

    def change(type_: int, **kw: object) -> T.Change:
        return T.Change(type=type_, user_id="u", message_id="m", **kw)  # type: ignore[arg-type]

    assert feedback_label(change(labels, added_label_ids=["SPAM"], label_ids=["SPAM"])) is True
    assert feedback_label(change(labels, removed_label_ids=["SPAM"], label_ids=["INBOX"])) is False
    assert feedback_label(change(labels, removed_label_ids=["SPAM"], label_ids=["TRASH"])) is None
    assert feedback_label(change(labels, removed_label_ids=["SPAM"], label_ids=[])) is None
    assert feedback_label(change(labels, added_label_ids=["STARRED"], label_ids=["INBOX"])) is None
    assert feedback_label(change(T.CHANGE_TYPE_MESSAGE_ADDED, added_label_ids=["SPAM"])) is None
    assert feedback_label(change(T.CHANGE_TYPE_MESSAGE_DELETED, removed_label_ids=["SPAM"])) is None


async def test_a_message_gone_before_its_event_is_skipped(
        mesh: Mesh, users: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    db = open_database(tmp_path / "gone.db")
    channel = grpcclient.channel(mesh.settings.addr("mailbox"), mesh.settings)
    try:
        feedback = SpamFeedback(SpamFilter(db), mesh.js, lambda: pb_grpc.MailboxServiceStub(channel))
        event = events_pb2.MailboxEvent(change=types_pb2.Change(
            type=types_pb2.CHANGE_TYPE_LABELS_CHANGED, user_id=users["alice"], message_id="nope",
            added_label_ids=["SPAM"], label_ids=["SPAM"]))
        await feedback.handle(event)  # no exception: acked and forgotten
        assert feedback.trained == 0
    finally:
        await channel.close()
        await db.close()


async def test_consumer_retries_when_nats_fails_instead_of_ending(tmp_path: Path) -> None:
    class FlakyJetStream:
        calls = 0

        async def pull_subscribe(self, *args: object, **kwargs: object) -> object:
            FlakyJetStream.calls += 1
            raise TimeoutError  # what nats-py raises while the server is down

    db = open_database(tmp_path / "flaky.db")
    try:
        feedback = SpamFeedback(SpamFilter(db), FlakyJetStream(),  # type: ignore[arg-type]
                                lambda: None)  # type: ignore[arg-type,return-value]
        stop = asyncio.Event()
        task = asyncio.create_task(feedback.run(stop))
        await eventually(lambda: _true_when(FlakyJetStream.calls >= 2), "a second attempt")
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        await db.close()


async def _true_when(value: bool) -> bool:
    return value


def test_the_block_ingest_prepends_is_taken_off_before_training() -> None:
    from svc_ingest.pipeline import prepend_headers

    for raw in (raw_message(9), raw_message(9).replace(b"\r\n", b"\n")):
        stored = prepend_headers(raw, [
            ("Return-Path", "<promo9@offers.test>"),
            ("Received", "from mail.offers.test ([192.0.2.7])\r\n\tby mx.example.com (mailmesh)\r\n\t"
                         "with ESMTPS id abc; Mon, 1 Jul 2002 10:00:01 +0000"),
            ("Authentication-Results", "mx.example.com; spf=pass smtp.mailfrom=offers.test"),
            ("X-Spam-Score", "7.1"), ("X-Spam-Status", "Yes, score=7.1 required=5.0 tests=BAYES_99")])
        assert strip_ingest_headers(stored) == raw
    # mail that did not come through svc_ingest (e.g. appended by a client) is left alone
    other = b"Return-Path: <a@b.test>\nReceived: from x by y; Mon, 1 Jul 2002\n" + raw_message(9)
    assert strip_ingest_headers(other) == other
    assert strip_ingest_headers(raw_message(9)) == raw_message(9)
