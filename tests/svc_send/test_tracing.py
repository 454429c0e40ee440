"""One trace follows a sent message: the client's span → Send (gRPC) → release (after the undo
window, from the scheduler) → OUTBOUND message headers → outbound.consume → outbound.attempt."""

from __future__ import annotations

import pytest
from mailmesh.v1 import types_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mailmesh_common import telemetry
from tests.svc_send.conftest import REMOTE, SendMesh, wait_for


async def _delivered(sm: SendMesh, user: str, msg_id: str) -> bool:
    return (await sm.states(user, msg_id)).get(f"dave@{REMOTE}") == types_pb2.RECIPIENT_STATE_DELIVERED


@pytest.mark.send_settings(undo_send_s=0.3)
async def test_delivery_attempt_joins_the_trace_of_the_send(sm: SendMesh,
                                                            spans: InMemorySpanExporter) -> None:
    alice = sm.users["alice"]
    with telemetry.tracer().start_as_current_span("client.send") as root:
        trace_id = root.get_span_context().trace_id
        r = await sm.send_mail(alice, to=(f"dave@{REMOTE}",))
    await wait_for(lambda: _delivered(sm, alice, r.message_id), "the delivery")

    async def spans_ended() -> bool:  # the consumer's spans end just after it records the status
        names = {s.name for s in spans.get_finished_spans() if s.context.trace_id == trace_id}
        return {"send.release", "outbound.consume", "outbound.attempt"} <= names

    await wait_for(spans_ended, "the delivery's spans")
    finished = spans.get_finished_spans()
    by_name = {s.name: s for s in finished if s.context.trace_id == trace_id}
    assert {"send.release", "outbound.consume", "outbound.attempt"} <= set(by_name), sorted(by_name)
    attempt = by_name["outbound.attempt"]
    assert attempt.parent is not None and attempt.parent.span_id == by_name["outbound.consume"].context.span_id
    assert attempt.attributes is not None
    assert attempt.attributes["mailmesh.domain"] == REMOTE and attempt.attributes["mailmesh.delivered"] == 1
