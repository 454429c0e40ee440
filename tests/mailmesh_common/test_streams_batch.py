"""streams.consume_batch against a real nats-server: bounded batches, ack only after the handler
returns, nak (redelivered) and term (never again) as the handler marks each message, the whole
batch redelivered when the handler fails, undecodable payloads terminated, and each message's
work joined to its producer's trace."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from mailmesh.v1 import events_pb2, types_pb2
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mailmesh_common import streams, telemetry
from mailmesh_common.errors import Unavailable

pytestmark = pytest.mark.asyncio(loop_scope="function")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = telemetry.setup_telemetry("tests")
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        exporter.shutdown()


@pytest_asyncio.fixture(loop_scope="function")
async def js(nats_server: str) -> AsyncIterator[JetStreamContext]:
    nc: NATS = await streams.connect(nats_server, name="test-batch")
    ctx = nc.jetstream()
    await streams.ensure_streams(ctx)
    try:
        yield ctx
    finally:
        await nc.close()


def event(name: str) -> events_pb2.MailboxEvent:
    return events_pb2.MailboxEvent(change=types_pb2.Change(user_id="u1", message_id=name, modseq=1))


async def until(pred: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def settled(js: JetStreamContext, durable: str) -> bool:
    info = await js.consumer_info(streams.EVENTS.name, durable)
    return not info.num_pending and not info.num_ack_pending


async def test_batches_are_bounded_and_each_message_is_settled_as_marked(
        js: JetStreamContext, spans: InMemorySpanExporter) -> None:
    names = [f"m{i}" for i in range(10)] + ["again", "poison"]
    traces: dict[str, int] = {}
    for n in names:
        with telemetry.tracer().start_as_current_span(f"produce {n}") as span:
            traces[n] = span.get_span_context().trace_id
            await streams.publish(js, streams.events_subject("u1"), event(n), msg_id=n)
    await js.publish(streams.events_subject("u1"), b"\xff\xfe not a MailboxEvent")

    sizes: list[int] = []
    seen: list[tuple[str, int]] = []
    handler_traces: dict[str, int] = {}

    async def handler(batch: list[streams.Delivery[events_pb2.MailboxEvent]]) -> None:
        sizes.append(len(batch))
        for d in batch:
            name = d.payload.change.message_id
            seen.append((name, d.attempts))
            with d.span("test.handle") as span:
                handler_traces[name] = span.get_span_context().trace_id
            if name == "again" and d.attempts == 1:
                d.nak(0.1)
            elif name == "poison":
                d.term()

    stop = asyncio.Event()
    opts = streams.ConsumerOptions(durable="batch-test", batch=4, fetch_timeout_s=0.5, nak_delay_s=0.1)
    task = asyncio.create_task(streams.consume_batch(js, streams.EVENTS, events_pb2.MailboxEvent, handler, opts, stop))
    try:
        await until(lambda: ("again", 2) in seen)
        for _ in range(200):
            if await settled(js, "batch-test"):
                break
            await asyncio.sleep(0.05)
        assert await settled(js, "batch-test")  # acked, terminated: nothing left to deliver
        await asyncio.sleep(0.6)  # a terminated or acked message would be back by now
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert max(sizes) <= 4
    handled = [n for n, _ in seen]
    assert sorted(set(handled)) == sorted(names)  # the undecodable one never reached the handler
    assert handled.count("poison") == 1 and handled.count("again") == 2
    assert all(handled.count(n) == 1 for n in names if n != "again")
    assert all(handler_traces[n] == traces[n] for n in names)  # each message's work joins its trace
    batch_spans = [s for s in spans.get_finished_spans() if s.name == "events.consume_batch"]
    assert batch_spans and all(len(s.links) <= 4 for s in batch_spans)
    assert {link.context.trace_id for s in batch_spans for link in s.links} == set(traces.values())


async def test_a_failing_handler_gets_the_whole_batch_again(js: JetStreamContext) -> None:
    for i in range(3):
        await streams.publish(js, streams.events_subject("u2"), event(f"f{i}"), msg_id=f"f{i}")
    calls: list[list[str]] = []

    async def handler(batch: list[streams.Delivery[events_pb2.MailboxEvent]]) -> None:
        calls.append([d.payload.change.message_id for d in batch])
        if len(calls) == 1:
            raise Unavailable("backend down")

    stop = asyncio.Event()
    opts = streams.ConsumerOptions(durable="batch-fail", batch=16, fetch_timeout_s=0.5, nak_delay_s=0.1)
    task = asyncio.create_task(streams.consume_batch(js, streams.EVENTS, events_pb2.MailboxEvent, handler, opts, stop))
    try:
        await until(lambda: sorted(n for c in calls[1:] for n in c) == ["f0", "f1", "f2"])
        for _ in range(200):
            if await settled(js, "batch-fail"):
                break
            await asyncio.sleep(0.05)
        assert await settled(js, "batch-fail")
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    assert sorted(calls[0]) == ["f0", "f1", "f2"]  # nothing was acked by the failed call
