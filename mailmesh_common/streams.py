"""JetStream streams of the mesh and the one way to publish to and consume from them.

INBOUND   inbound.<partition>        durable messages awaiting local delivery (work queue)
EVENTS    mailbox.events.<user_id>   committed mailbox changes (fan-out, kept 7 days)
OUTBOUND  outbound.<domain>          remote deliveries (work queue)

`publish` injects `traceparent`, sets `Nats-Msg-Id` and awaits the ack (raising Unavailable);
`consume` opens a CONSUMER span from the headers, acks after the handler returns, naks with a
delay on Unavailable, and terminates what cannot be decoded.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import nats
from google.protobuf.message import DecodeError, Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

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
    cfg = js_api.ConsumerConfig(durable_name=opts.durable, ack_policy=js_api.AckPolicy.EXPLICIT,
                                ack_wait=opts.ack_wait_s, max_ack_pending=opts.max_ack_pending,
                                max_deliver=opts.max_deliver,
                                filter_subject=opts.filter_subject or None)
    sub = await js.pull_subscribe(opts.filter_subject or spec.subjects[0], durable=opts.durable,
                                  stream=spec.name, config=cfg)
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(opts.batch, timeout=opts.fetch_timeout_s)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except Exception as exc:
                if stop.is_set():
                    break
                log.warning("fetch from %s failed: %s", spec.name, exc)
                await asyncio.sleep(0.5)
                continue
            for raw in msgs:
                await _handle_one(raw, spec, msg_type, handler, opts)
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
