"""One trace follows a message: the producer's span → INBOUND consumer span → mailbox change →
EVENTS message carrying the same trace id; gRPC calls get server spans, health probes none."""

from __future__ import annotations

import asyncio
import time

from mailmesh.v1 import events_pb2
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc
from nats.js import api as js_api
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mailmesh_common import auth, grpcclient, streams, telemetry
from mailmesh_common.blobstore import BlobStore
from tests.svc_mailbox.conftest import Mesh


async def test_trace_follows_inbound_message_to_events(mesh: Mesh, users: dict[str, str],
                                                       spans: InMemorySpanExporter) -> None:
    alice = users["alice"]
    ref = await BlobStore(mesh.settings.data_dir / "blobs").put(
        b"From: x@remote.test\r\nTo: alice@example.com\r\nSubject: traced\r\nMessage-ID: <t1@remote.test>\r\n\r\nhi\r\n")
    sub = await mesh.js.subscribe(streams.events_subject(alice), ordered_consumer=True,
                                  config=js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL))
    with telemetry.tracer().start_as_current_span("smtp.data") as root:
        trace_id = format(root.get_span_context().trace_id, "032x")
        await streams.publish(mesh.js, streams.inbound_subject("trace-1"), events_pb2.InboundMessage(
            ingest_id="trace-1", rcpt_to=["alice@example.com"], blob_ref=ref), msg_id="trace-1")
    deadline = time.monotonic() + 10
    seen = None
    while time.monotonic() < deadline:
        msg = await sub.next_msg(timeout=deadline - time.monotonic())
        ev = events_pb2.MailboxEvent.FromString(msg.data)
        if ev.change.type == 1:  # MESSAGE_ADDED
            seen = msg
            break
    assert seen is not None, "no MESSAGE_ADDED event on EVENTS"
    assert (seen.headers or {}).get("traceparent", "").split("-")[1] == trace_id
    consume = [s for s in spans.get_finished_spans() if s.name == "inbound.consume"]
    assert consume and format(consume[0].context.trace_id, "032x") == trace_id
    await sub.unsubscribe()


async def test_grpc_calls_are_traced_and_health_is_not(mesh: Mesh, users: dict[str, str],
                                                       spans: InMemorySpanExporter) -> None:
    ch = grpcclient.channel(mesh.settings.addr("mailbox"), mesh.settings)
    try:
        stub = pb_grpc.MailboxServiceStub(ch)
        with telemetry.tracer().start_as_current_span("client.root") as root:
            await stub.ListLabels(pb.ListLabelsRequest(parent=f"users/{users['alice']}"),
                                  metadata=((auth.USER_KEY, users["alice"]),), timeout=5)
        await asyncio.sleep(0.1)
        names = [(s.name, format(s.context.trace_id, "032x")) for s in spans.get_finished_spans()]
        tid = format(root.get_span_context().trace_id, "032x")
        server = [n for n, t in names if "ListLabels" in n and t == tid]
        assert len(server) >= 2, names  # client span and server span in one trace
        assert not any("Health" in n for n, _ in names)
    finally:
        await ch.close()


async def test_mesh_channel_authenticates_streaming_calls(mesh: Mesh, users: dict[str, str]) -> None:
    ch = grpcclient.channel(mesh.settings.addr("mailbox"), mesh.settings)
    try:
        stub = pb_grpc.MailboxServiceStub(ch)
        got = [x async for x in stub.ExportMessages(pb.ExportMessagesRequest(parent=f"users/{users['alice']}"),
                                                    timeout=10)]
        assert got == []  # authenticated (no UNAUTHENTICATED), and alice has no mail yet
    finally:
        await ch.close()
