"""IngestService over real gRPC: InjectMessage runs the SMTP pipeline with its guarantees
(recipient checks, authentication, limits, durable handoff, idempotency key); ClassifyMessage
and TrainSpam drive the spam filter; the mesh token is required."""

from __future__ import annotations

import time

import grpc
import pytest
from mailmesh.v1 import events_pb2
from mailmesh.v1 import ingest_service_pb2 as pb

from tests.svc_ingest.conftest import IngestMesh, message

pytestmark = pytest.mark.asyncio(loop_scope="module")


def inject(raw: bytes, *rcpts: str, **kw: object) -> pb.InjectMessageRequest:
    fields: dict[str, object] = dict(raw=raw, mail_from="sender@remote.test", rcpt_to=list(rcpts),
                                     client_ip="127.0.0.1", helo="client.remote.test")
    fields.update(kw)
    return pb.InjectMessageRequest(**fields)  # type: ignore[arg-type]


async def inbound_last_seq(m: IngestMesh) -> int:
    return int((await m.mailbox.js.stream_info("INBOUND")).state.last_seq)


async def test_inject_delivers_and_reports_each_recipient(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    m.dns.add("remote.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    resp = await m.stub.InjectMessage(inject(message("injected"), "alice@example.com", "nobody@example.com",
                                             "x@elsewhere.test", "bob@example.com"), metadata=m.md())
    assert resp.ingest_id
    assert [(r.address, r.accepted, r.reply) for r in resp.recipients] == [
        ("alice@example.com", True, ""), ("nobody@example.com", False, "550 5.1.1 No such user"),
        ("x@elsewhere.test", False, "554 5.7.1 Relay access denied"), ("bob@example.com", True, "")]
    assert resp.authentication_results.startswith("mx.mailmesh.test; spf=pass")
    assert resp.HasField("spam")
    a = await m.wait_subject("alice", "injected")
    b = await m.wait_subject("bob", "injected")
    assert a.blob_ref == b.blob_ref
    raw = await m.raw("alice", a.id)
    assert f"with HTTP id {resp.ingest_id}".encode() not in raw  # an unspecified source is SMTP
    assert f"id {resp.ingest_id}".encode() in raw


async def test_trusted_internal_source_skips_spf_and_spam(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    resp = await m.stub.InjectMessage(inject(message("from inside"), "carol@example.com", client_ip="",
                                             source=events_pb2.MESSAGE_SOURCE_INTERNAL), metadata=m.md())
    assert resp.ingest_id and not resp.HasField("spam")
    assert "spf=none" in resp.authentication_results
    got = await m.wait_subject("carol", "from inside")
    assert f"with HTTP id {resp.ingest_id}".encode() in await m.raw("carol", got.id)


async def test_inject_with_the_same_idempotency_key_delivers_once(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    before = await inbound_last_seq(m)
    req = inject(message("only once"), "bob@example.com", idempotency_key="order-42")
    first = await m.stub.InjectMessage(req, metadata=m.md())
    second = await m.stub.InjectMessage(req, metadata=m.md())
    assert first.ingest_id == second.ingest_id
    await m.wait_subject("bob", "only once")
    assert await inbound_last_seq(m) == before + 1  # Nats-Msg-Id dedup
    time.sleep(0.3)
    assert sum(1 for x in await m.messages("bob") if x.subject == "only once") == 1


async def test_inject_without_deliverable_recipients_hands_off_nothing(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    before = await inbound_last_seq(m)
    resp = await m.stub.InjectMessage(inject(message("nobody home"), "ghost@example.com"), metadata=m.md())
    assert resp.ingest_id == ""
    assert [r.reply for r in resp.recipients] == ["550 5.1.1 No such user"]
    assert await inbound_last_seq(m) == before


@pytest.mark.parametrize(("req", "code"), [
    (pb.InjectMessageRequest(raw=b"", rcpt_to=["alice@example.com"]), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.InjectMessageRequest(raw=b"Subject: x\r\n\r\nx\r\n"), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.InjectMessageRequest(raw=b"x" * (25 * 1024 * 1024 + 1), rcpt_to=["alice@example.com"]),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
    (pb.InjectMessageRequest(raw=b"Subject: x\r\n\r\nx\r\n", rcpt_to=["alice@example.com"] * 101),
     grpc.StatusCode.RESOURCE_EXHAUSTED),
])
async def test_inject_refuses_bad_requests(shared_ingest: IngestMesh, req: pb.InjectMessageRequest,
                                           code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shared_ingest.stub.InjectMessage(req, metadata=shared_ingest.md())
    assert err.value.code() == code


async def test_inject_loop_and_dmarc_reject_are_refused(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    hops = tuple(f"Received: from h{i}.test by h{i + 1}.test; Mon, 23 Nov 2026 10:00:00 +0000" for i in range(51))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await m.stub.InjectMessage(inject(message("loop", headers=hops), "alice@example.com"), metadata=m.md())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    m.dns.add("guarded.test", "TXT", "v=spf1 -all")
    m.dns.add("_dmarc.guarded.test", "TXT", "v=DMARC1; p=reject")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await m.stub.InjectMessage(inject(message("forged", sender="ceo@guarded.test"), "alice@example.com",
                                          mail_from="ceo@guarded.test"), metadata=m.md())
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "DMARC" in (err.value.details() or "")


async def test_calls_without_the_mesh_token_are_refused(shared_ingest: IngestMesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await shared_ingest.stub.ClassifyMessage(pb.ClassifyMessageRequest(raw=message("x")))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- the spam filter ------------------------------------------------------------------------------

def spammy(i: int) -> bytes:
    return message(f"CHEAP PILLS WINNER {i}", sender=f"promo{i}@bulk.test",
                   body=f"Buy cheap pills now!!! Limited offer, click http://198.51.100.{i % 250}/buy "
                        f"viagra casino jackpot winner free money {i}\r\n")


def hammy(i: int) -> bytes:
    return message(f"Meeting notes {i}", sender=f"colleague{i}@work.test",
                   body=f"Hi, attached are the notes from Tuesday's project review {i}. The schedule for "
                        "the quarterly report stays as agreed; see you at the planning meeting.\r\n")


async def test_train_then_classify(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    stub, md = m.stub, m.md()
    last = pb.TrainSpamResponse()
    for i in range(25):
        await stub.TrainSpam(pb.TrainSpamRequest(raw=spammy(i), is_spam=True), metadata=md)
        last = await stub.TrainSpam(pb.TrainSpamRequest(raw=hammy(i), is_spam=False), metadata=md)
    assert (last.spam_messages, last.ham_messages) == (25, 25)
    spam = (await stub.ClassifyMessage(pb.ClassifyMessageRequest(raw=spammy(99)), metadata=md)).spam
    ham = (await stub.ClassifyMessage(pb.ClassifyMessageRequest(raw=hammy(99)), metadata=md)).spam
    assert spam.score > ham.score
    assert spam.is_spam and not ham.is_spam
    assert spam.status and ham.status
    # the same verdict is what InjectMessage hands to INBOUND, and spam lands in SPAM
    resp = await stub.InjectMessage(inject(spammy(100), "alice@example.com"), metadata=md)
    assert resp.spam.is_spam
    await m.wait_subject("alice", "CHEAP PILLS WINNER 100", label="SPAM")
