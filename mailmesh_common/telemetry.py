"""OpenTelemetry for every service: tracer provider, OTLP export, gRPC interceptors, and W3C
trace context carried in NATS headers."""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Span, SpanKind

_provider: TracerProvider | None = None
_lock = threading.Lock()

HEALTH_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                   "grpc.reflection.v1.ServerReflection")


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line to a file (for debugging and tests)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for s in spans:
            ctx = s.get_span_context()
            parent = s.parent
            lines.append(json.dumps({
                "name": s.name,
                "kind": s.kind.name if s.kind else "",
                "trace_id": format(ctx.trace_id, "032x") if ctx else "",
                "span_id": format(ctx.span_id, "016x") if ctx else "",
                "parent_span_id": format(parent.span_id, "016x") if parent else "",
                "service": s.resource.attributes.get("service.name", ""),
                "attributes": {k: v if isinstance(v, (str, int, float, bool)) else str(v)
                               for k, v in (s.attributes or {}).items()},
                "status": s.status.status_code.name,
            }))
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def setup_telemetry(service: str, *, trace_file: str = "",
                    extra_exporters: Sequence[SpanExporter] = ()) -> TracerProvider:
    """Installs the global tracer provider once per process; OTLP when the endpoint is set."""
    global _provider
    with _lock:
        if _provider is not None:
            return _provider
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        if trace_file:
            provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(trace_file)))
        for exp in extra_exporters:
            provider.add_span_processor(SimpleSpanProcessor(exp))
        trace.set_tracer_provider(provider)
        _provider = provider
        return provider


def shutdown_telemetry() -> None:
    if _provider is not None:
        _provider.shutdown()


@functools.lru_cache(maxsize=64)
def tracer(name: str = "mailmesh") -> trace.Tracer:
    """The tracer of `name`, made once: the SDK builds a new Tracer on every get_tracer call, and
    spans are started per message. One made before setup_telemetry is a proxy that switches to
    the real provider once that is installed."""
    return trace.get_tracer(name)


def grpc_server_interceptors() -> list[Any]:
    """OpenTelemetry aio server interceptor, leaving health and reflection probes untraced."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    untraced = filters.any_of(*(filters.service_name(s) for s in HEALTH_SERVICES))
    return [aio_server_interceptor(filter_=filters.negate(untraced))]


def grpc_client_interceptors() -> list[Any]:
    from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters

    untraced = filters.any_of(*(filters.service_name(s) for s in HEALTH_SERVICES))
    return list(aio_client_interceptors(filter_=filters.negate(untraced)))


def inject_headers(headers: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Adds W3C `traceparent`/`tracestate` for the current span (NATS message headers)."""
    headers = {} if headers is None else headers
    propagate.inject(headers)
    return headers


def traceparent(span: Span) -> str:
    """The W3C `traceparent` of `span` (what inject_headers writes while it is current), without
    making it current: for work recorded per message in a batch; "" for an invalid span."""
    sc = span.get_span_context()
    if not sc.is_valid:
        return ""
    return f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}"


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    return propagate.extract(dict(headers or {}))


@contextmanager
def consumer_span(name: str, headers: Mapping[str, str] | None,
                  attributes: Mapping[str, Any] | None = None) -> Iterator[Span]:
    """A CONSUMER span whose parent is the producer's context from the message headers."""
    ctx = extract_context(headers)
    with tracer().start_as_current_span(name, context=ctx, kind=SpanKind.CONSUMER,
                                        attributes=dict(attributes or {})) as span:
        yield span
