"""RCPT checks remember a local user for a few seconds, so a burst of mail to the same people
asks svc_mailbox once; unknown users and anything but a plain "local user" answer are asked
again every time, and so is a message bigger than the one the answer was given for."""

from __future__ import annotations

from mailmesh.v1 import mailbox_service_pb2 as mb_pb
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from svc_ingest import replies
from tests.svc_ingest.conftest import IngestMesh, in_thread, message


def resolve_calls(spans: InMemorySpanExporter) -> int:
    return sum(1 for s in spans.get_finished_spans()
               if s.kind == SpanKind.SERVER and s.name.endswith("ResolveRecipient"))


def send(m: IngestMesh, raw: bytes) -> dict[str, tuple[int, bytes]]:
    with m.smtp() as s:
        return s.sendmail("sender@remote.test", ["alice@example.com"], raw)


def rcpt(m: IngestMesh, address: str, size: int = 0) -> tuple[int, bytes]:
    with m.smtp() as s:
        s.ehlo()
        s.docmd(f"MAIL FROM:<sender@remote.test> SIZE={size}")
        return s.docmd(f"RCPT TO:<{address}>")


async def test_a_burst_to_one_user_asks_the_mailbox_once(ingest_mesh: IngestMesh,
                                                         span_exporter: InMemorySpanExporter) -> None:
    m = ingest_mesh
    before = resolve_calls(span_exporter)
    for i in range(3):
        assert await in_thread(send, m, message(f"burst {i}")) == {}
    assert resolve_calls(span_exporter) - before == 1
    for i in range(3):
        await m.wait_subject("alice", f"burst {i}")


async def test_an_unknown_user_is_asked_again_and_found_once_created(ingest_mesh: IngestMesh) -> None:
    m = ingest_mesh
    assert (await in_thread(rcpt, m, "dave@example.com"))[0] == 550
    await m.mailbox.stub.CreateAccount(mb_pb.CreateAccountRequest(
        email="dave@example.com", password="correct horse battery"), metadata=m.mailbox.md())
    assert (await in_thread(rcpt, m, "dave@example.com"))[0] == 250


async def test_a_bigger_message_is_checked_against_the_quota_again(ingest_mesh: IngestMesh) -> None:
    r = ingest_mesh.ingest.recipients
    assert (await r.check("alice@example.com", 1000)).reply is replies.RECIPIENT_OK
    assert (await r.check("ALICE@example.com", 500)).reply is replies.RECIPIENT_OK  # remembered
    over = ingest_mesh.settings.default_quota_bytes + 1
    assert (await r.check("alice@example.com", over)).reply is replies.MAILBOX_FULL
