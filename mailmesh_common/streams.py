"""JetStream streams of the mesh and the one way to publish to and consume from them.

INBOUND   inbound.<partition>        durable messages awaiting local delivery (work queue)
EVENTS    mailbox.events.<user_id>   committed mailbox changes (fan-out, kept 7 days)
OUTBOUND  outbound.<domain>          remote deliveries (work queue)

`publish` injects `traceparent`, sets `Nats-Msg-Id` and awaits the ack (raising Unavailable);
`consume` opens a CONSUMER span from the headers, acks after the handler returns, naks with a
delay on Unavailable, and terminates what cannot be decoded. `consume_batch` does the same for
a batch at a time (at most `batch` messages, waiting at most `fetch_timeout_s` for the first),
for handlers that commit a whole batch at once: each message is acked after the handler returns
unless the handler marked it for redelivery (nak) or termination.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import nats
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError
from opentelemetry import context as otel_context
from opentelemetry import trace

from mailmesh_common import telemetry
from mailmesh_common.errors import MailmeshError, Unavailable

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    retention: js_api.RetentionPolicy
    max_age_s: float
    duplicate_window_s: float
    description: str


INBOUND = StreamSpec("INBOUND", ("inbound.>",), js_api.RetentionPolicy.WORK_QUEUE, 14 * 86400, 3600,
                     "Accepted mail awaiting delivery to local mailboxes")
EVENTS = StreamSpec("EVENTS", ("mailbox.events.>",), js_api.RetentionPolicy.LIMITS, 7 * 86400, 3600,
                    "Committed mailbox changes, one subject per user")
OUTBOUND = StreamSpec("OUTBOUND", ("outbound.>",), js_api.RetentionPolicy.WORK_QUEUE, 6 * 86400, 3600,
                      "Mail awaiting delivery to remote servers, one subject per domain")
ALL_STREAMS = (INBOUND, EVENTS, OUTBOUND)

INBOUND_PARTITIONS = 16


def inbound_subject(key: str) -> str:
    return f"inbound.p{zlib.crc32(key.encode()) % INBOUND_PARTITIONS}"


def events_subject(user_id: str) -> str:
    return f"mailbox.events.{user_id}"


def outbound_subject(domain: str) -> str:
    return "outbound." + domain.replace(".", "_").replace("*", "_").replace(">", "_")


async def _on_error(exc: Exception) -> None:
    log.warning("NATS: %s: %s", exc.__class__.__name__, exc)


async def _on_disconnect() -> None:
    log.debug("NATS: disconnected")


async def _on_reconnect() -> None:
    log.warning("NATS: connection was lost and is restored")


async def connect(url: str, *, name: str, timeout_s: float = 5.0, max_reconnect: int = -1) -> NATS:
    """Connects to NATS; Unavailable with a clear message when it cannot."""
    try:
        # nats-py retries the first connect forever when reconnects are unlimited: bound it
        return await asyncio.wait_for(
            nats.connect(url, name=name, connect_timeout=timeout_s, max_reconnect_attempts=max_reconnect,
                         reconnect_time_wait=0.5, allow_reconnect=True, error_cb=_on_error,
                         disconnected_cb=_on_disconnect, reconnected_cb=_on_reconnect), timeout_s * 2)
    except Exception as exc:  # nats raises several unrelated types
        raise Unavailable(f"cannot connect to NATS at {url}: {exc.__class__.__name__}") from exc


def _config(spec: StreamSpec, replicas: int) -> js_api.StreamConfig:
    return js_api.StreamConfig(
        name=spec.name, description=spec.description, subjects=list(spec.subjects),
        retention=spec.retention, storage=js_api.StorageType.FILE, max_age=spec.max_age_s,
        duplicate_window=spec.duplicate_window_s, num_replicas=replicas,
        discard=js_api.DiscardPolicy.NEW if spec.retention == js_api.RetentionPolicy.WORK_QUEUE
        else js_api.DiscardPolicy.OLD,
    )


async def ensure_streams(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Creates or updates INBOUND, EVENTS, OUTBOUND; safe to call from every process at start."""
    replicas = max(1, min(replicas, 5))  # JetStream allows R1..R5
    for spec in ALL_STREAMS:
        cfg = _config(spec, replicas)
        try:
            await js.stream_info(spec.name)
            await js.update_stream(cfg)
        except NotFoundError:
            try:
                await js.add_stream(cfg)
            except Exception as exc:  # raced with another process creating it
                try:
                    await js.stream_info(spec.name)
                except Exception:
                    raise Unavailable(f"cannot create stream {spec.name}: {exc}") from exc


async def publish(js: JetStreamContext, subject: str, msg: Message, *, msg_id: str,
                  timeout_s: float = 5.0, headers: dict[str, str] | None = None) -> js_api.PubAck:
    """Publishes a protobuf payload with trace context and dedup id; returns only once acked."""
    hdrs: dict[str, str] = dict(headers or {})
    if "traceparent" not in hdrs:  # a caller relaying a stored context keeps it
        telemetry.inject_headers(hdrs)
    hdrs["Nats-Msg-Id"] = msg_id
    try:
        return await js.publish(subject, msg.SerializeToString(), timeout=timeout_s, headers=hdrs)
    except Exception as exc:
        raise Unavailable(f"publish to {subject} not acknowledged: {exc.__class__.__name__}") from exc


Handler = Callable[[M, Msg], Awaitable[None]]


@dataclass
class ConsumerOptions:
    durable: str
    filter_subject: str = ""
    batch: int = 64
    ack_wait_s: float = 60.0
    max_ack_pending: int = 1024
    max_deliver: int = -1
    nak_delay_s: float = 2.0
    fetch_timeout_s: float = 1.0


async def consume(js: JetStreamContext, spec: StreamSpec, msg_type: type[M], handler: Handler[M],
                  opts: ConsumerOptions, stop: asyncio.Event) -> None:
    """Runs a durable pull consumer until `stop` is set. Each message: decode, span, handler, ack."""
    async def each(msgs: list[Msg]) -> None:
        for raw in msgs:
            await _handle_one(raw, spec, msg_type, handler, opts)

    await _pull_loop(js, spec, opts, opts.batch, opts.max_ack_pending, each, stop)


async def _pull_loop(js: JetStreamContext, spec: StreamSpec, opts: ConsumerOptions, batch: int,
                     max_ack_pending: int, on_msgs: Callable[[list[Msg]], Awaitable[None]],
                     stop: asyncio.Event) -> None:
    """The durable pull subscription both consumers share: fetch up to `batch` messages at a
    time until `stop` is set (a failed fetch is logged and retried), then unsubscribe."""
    cfg = js_api.ConsumerConfig(durable_name=opts.durable, ack_policy=js_api.AckPolicy.EXPLICIT,
                                ack_wait=opts.ack_wait_s, max_ack_pending=max_ack_pending,
                                max_deliver=opts.max_deliver, filter_subject=opts.filter_subject or None)
    sub = await js.pull_subscribe(opts.filter_subject or spec.subjects[0], durable=opts.durable,
                                  stream=spec.name, config=cfg)
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=opts.fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:
                if stop.is_set():
                    break
                log.warning("fetch from %s failed: %s", spec.name, exc)
                await asyncio.sleep(0.5)
                continue
            await on_msgs(msgs)
    finally:
        try:
            await sub.unsubscribe()
        except Exception:
            pass


async def _handle_one(raw: Msg, spec: StreamSpec, msg_type: type[M], handler: Handler[M],
                      opts: ConsumerOptions) -> None:
    headers = raw.headers or {}
    with telemetry.consumer_span(f"{spec.name.lower()}.consume", headers,
                                 {"messaging.system": "nats", "messaging.destination.name": raw.subject,
                                  "messaging.consumer.group.name": opts.durable}) as span:
        try:
            payload = msg_type.FromString(raw.data)
        except DecodeError:
            log.error("terminating undecodable message on %s", raw.subject)
            span.set_attribute("mailmesh.terminated", True)
            await raw.term()
            return
        try:
            await handler(payload, raw)
        except Unavailable as exc:
            log.warning("temporary failure handling %s: %s; redelivery in %.1fs", raw.subject, exc.message,
                        opts.nak_delay_s)
            await raw.nak(delay=opts.nak_delay_s)
            return
        except MailmeshError as exc:
            # a permanent, explained failure: the handler decides whether to bounce; keep it for retry
            log.error("failed handling %s: %s", raw.subject, exc.message)
            await raw.nak(delay=opts.nak_delay_s * 10)
            return
        except Exception:
            log.exception("unexpected error handling %s", raw.subject)
            await raw.nak(delay=opts.nak_delay_s * 10)
            return
        try:
            await raw.ack_sync()
        except Exception as exc:  # NATS went away after the commit: redelivery is deduplicated
            log.warning("ack on %s not confirmed (%s); it may be redelivered", raw.subject, exc.__class__.__name__)


# --- batches -------------------------------------------------------------------------------------

MAX_BATCH = 4096  # messages per batch, whatever the options say
MAX_SPAN_LINKS = 128  # links from a batch span to the producers' contexts

Outcome = Literal["ack", "nak", "term"]


@dataclass
class Delivery(Generic[M]):
    """One decoded message of a batch. The handler leaves it to be acked (the default), or calls
    `nak` (redelivery, after a delay) or `term` (never redelivered); consume_batch settles it
    with the server after the handler returns."""

    payload: M
    raw: Msg
    context: otel_context.Context
    outcome: Outcome = "ack"
    delay_s: float | None = None

    @property
    def subject(self) -> str:
        return self.raw.subject

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.raw.headers or {})

    @property
    def attempts(self) -> int:
        """How many times this message was delivered (1 the first time)."""
        try:
            return int(self.raw.metadata.num_delivered or 1)
        except Exception:
            return 1

    def ack(self) -> None:
        self.outcome, self.delay_s = "ack", None

    def nak(self, delay_s: float | None = None) -> None:
        self.outcome, self.delay_s = "nak", delay_s

    def term(self) -> None:
        self.outcome = "term"

    @contextlib.contextmanager
    def span(self, name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[trace.Span]:
        """The current span for work on this message: a CONSUMER span, child of the producer's
        `traceparent`."""
        attrs = {"messaging.system": "nats", "messaging.destination.name": self.raw.subject, **(attributes or {})}
        with telemetry.tracer().start_as_current_span(name, context=self.context, kind=trace.SpanKind.CONSUMER,
                                                      attributes=attrs) as span:
            yield span


BatchHandler = Callable[[list[Delivery[M]]], Awaitable[None]]


async def consume_batch(js: JetStreamContext, spec: StreamSpec, msg_type: type[M], handler: BatchHandler[M],
                        opts: ConsumerOptions, stop: asyncio.Event) -> None:
    """Runs a durable pull consumer until `stop` is set, a batch at a time: fetch up to
    `opts.batch` messages (waiting at most `opts.fetch_timeout_s`), terminate the undecodable,
    call the handler once with the rest inside a CONSUMER span linked to every producer's
    context, then ack, nak or terminate each as the handler marked it. If the handler raises,
    every message not marked for termination is nakked: after `opts.nak_delay_s` for
    Unavailable, ten times that for any other error."""
    batch = max(1, min(opts.batch, MAX_BATCH))

    async def whole(msgs: list[Msg]) -> None:
        await _handle_batch(msgs, spec, msg_type, handler, opts)

    await _pull_loop(js, spec, opts, batch, max(opts.max_ack_pending, batch), whole, stop)


async def _handle_batch(msgs: list[Msg], spec: StreamSpec, msg_type: type[M], handler: BatchHandler[M],
                        opts: ConsumerOptions) -> None:
    items: list[Delivery[M]] = []
    for raw in msgs:
        try:
            payload = msg_type.FromString(raw.data)
        except DecodeError:
            log.error("terminating undecodable message on %s", raw.subject)
            await _settle(raw, "term", None)
            continue
        items.append(Delivery(payload, raw, telemetry.extract_context(raw.headers or {})))
    if not items:
        return
    links = [trace.Link(ctx_span.get_span_context())
             for d in items[:MAX_SPAN_LINKS]
             if (ctx_span := trace.get_current_span(d.context)).get_span_context().is_valid]
    with telemetry.tracer().start_as_current_span(
            f"{spec.name.lower()}.consume_batch", kind=trace.SpanKind.CONSUMER, links=links,
            attributes={"messaging.system": "nats", "messaging.consumer.group.name": opts.durable,
                        "messaging.batch.message_count": len(items)}) as span:
        try:
            await handler(items)
        except Unavailable as exc:
            log.warning("temporary failure handling a batch of %d from %s: %s; redelivery in %.1fs",
                        len(items), spec.name, exc.message, opts.nak_delay_s)
            _nak_all(items, opts.nak_delay_s)
        except MailmeshError as exc:
            log.error("failed handling a batch of %d from %s: %s", len(items), spec.name, exc.message)
            _nak_all(items, opts.nak_delay_s * 10)
        except Exception:
            log.exception("unexpected error handling a batch of %d from %s", len(items), spec.name)
            _nak_all(items, opts.nak_delay_s * 10)
        counts = {"ack": 0, "nak": 0, "term": 0}
        for d in items:
            counts[d.outcome] += 1
            await _settle(d.raw, d.outcome, opts.nak_delay_s if d.delay_s is None else d.delay_s)
        span.set_attribute("mailmesh.acked", counts["ack"])
        span.set_attribute("mailmesh.nakked", counts["nak"])
        span.set_attribute("mailmesh.terminated", counts["term"])


def _nak_all(items: list[Delivery[M]], delay_s: float) -> None:
    for d in items:
        if d.outcome != "term":
            d.nak(delay_s)


async def _settle(raw: Msg, outcome: Outcome, delay_s: float | None) -> None:
    try:
        if outcome == "ack":
            await raw.ack()
        elif outcome == "nak":
            await raw.nak(delay=delay_s)
        else:
            await raw.term()
    except Exception as exc:  # NATS went away: the message comes back after ack_wait (handlers are idempotent)
        log.warning("%s on %s not sent (%s); it may be redelivered", outcome, raw.subject, exc.__class__.__name__)
