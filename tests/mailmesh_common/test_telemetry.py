"""telemetry.tracer: one tracer per name, made once, recording through the installed provider;
telemetry.traceparent: the W3C header of a span that is not current."""

from __future__ import annotations

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mailmesh_common import telemetry


def test_a_tracer_is_made_once_and_records_through_the_provider_installed_later() -> None:
    # made before setup_telemetry when this test runs first in its process: a proxy then
    early = telemetry.tracer("tests.telemetry.early")
    assert telemetry.tracer("tests.telemetry.early") is early
    assert telemetry.tracer("tests.telemetry.other") is not early
    exporter = InMemorySpanExporter()
    telemetry.setup_telemetry("tests").add_span_processor(SimpleSpanProcessor(exporter))
    try:
        with early.start_as_current_span("early.span") as span:
            assert span.get_span_context().is_valid
        assert [s.name for s in exporter.get_finished_spans()] == ["early.span"]
        scope = exporter.get_finished_spans()[0].instrumentation_scope
        assert scope is not None and scope.name == "tests.telemetry.early"
    finally:
        exporter.shutdown()


def test_traceparent_of_a_span_is_what_inject_headers_writes_inside_it() -> None:
    telemetry.setup_telemetry("tests")
    with telemetry.tracer("tests.telemetry.tp").start_as_current_span("producer") as span:
        assert telemetry.traceparent(span) == telemetry.inject_headers()["traceparent"]
    with telemetry.tracer("tests.telemetry.tp").start_as_current_span("outer"):
        inner = telemetry.tracer("tests.telemetry.tp").start_span("not current")
        assert telemetry.traceparent(inner) != telemetry.inject_headers()["traceparent"]
        assert telemetry.traceparent(inner).split("-")[2] == f"{inner.get_span_context().span_id:016x}"
        inner.end()
