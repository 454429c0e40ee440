"""The INBOUND consumer: delivers each accepted message to every local recipient's INBOX or
SPAM, idempotently (keyed by the ingest id), and acks only after every delivery committed.

Messages are taken from INBOUND in batches: the recipients of the whole batch are resolved in
one read transaction, the blobs touched concurrently, and the deliveries of the batch written
in as few transactions as the KV limits allow (`deliver_batch`); each message is acked after
the transaction holding its last delivery committed. The message record comes from the
`ParsedSummary` ingest attached, or from parsing the blob when a producer sent none. When a
batch transaction fails, its messages are delivered one by one (`handle`), so one bad message
cannot hold up the others.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats
from mailmesh.v1 import events_pb2
from mailmesh.v1 import mailbox_service_pb2 as pb
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from mailmesh_common import blobstore, mime, streams, telemetry
from mailmesh_common.address import MailAddress
from mailmesh_common.errors import InvalidInput, MailmeshError, NotFound, Unavailable
from mailmesh_common.kv.base import MAX_TRANSACTION_SIZE
from svc_mailbox import messages
from svc_mailbox.mailbox import BatchDelivery, Mailbox
from svc_mailbox.txn import now_us

log = logging.getLogger(__name__)

DURABLE = "svc-mailbox-delivery"
FETCH_BATCH = 64  # INBOUND messages taken per fetch
FETCH_TIMEOUT_S = 0.5
NAK_DELAY_S = 2.0
# Deliveries per transaction: a delivery writes its record (at most MAX_RECORD_BYTES), the
# record's copy in the changelog-sized index entries and the thread; four records' worth per
# delivery keeps a full transaction well under FoundationDB's 10 MB, and 64 deliveries of a
# few ms each well under its 5 s.
MAX_DELIVERIES_PER_TXN = min(64, MAX_TRANSACTION_SIZE // (4 * messages.MAX_RECORD_BYTES))


def parsed_from_summary(s: events_pb2.ParsedSummary, size: int) -> mime.ParsedMessage:
    """The ParsedMessage a delivery needs (headers, snippet, warnings; no bodies) from ingest's
    summary. Never cached as the message's parse: bodies and attachments are not in it."""
    def addrs(lst: Sequence[object]) -> list[MailAddress]:
        return [MailAddress(a.name, a.email) for a in list(lst)[:messages.MAX_ADDRESSES]]  # type: ignore[attr-defined]

    p = mime.ParsedMessage(
        subject=s.subject[:2000], from_=addrs(getattr(s, "from")), reply_to=addrs(s.reply_to), to=addrs(s.to),
        cc=addrs(s.cc), bcc=addrs(s.bcc), message_id=s.message_id[:900],
        in_reply_to=list(s.in_reply_to[:messages.MAX_REFERENCES]),
        references=list(s.references[-messages.MAX_REFERENCES:]), snippet=s.snippet[:200],
        has_attachments=s.has_attachments, parse_warnings=list(s.parse_warnings[:20]), size=size)
    if s.HasField("sender"):
        p.sender = MailAddress(s.sender.name, s.sender.email)
    if s.HasField("date"):
        p.date = s.date.ToDatetime(tzinfo=datetime.UTC)
    return p


def _received_us(msg: events_pb2.InboundMessage) -> int:
    return (msg.received_time.seconds * 1_000_000 + msg.received_time.nanos // 1000
            if msg.HasField("received_time") else 0)


def _target(msg: events_pb2.InboundMessage) -> int:
    spam = msg.quarantine or (msg.HasField("spam") and msg.spam.is_spam)
    return pb.DELIVERY_TARGET_SPAM if spam else pb.DELIVERY_TARGET_INBOX


def _ingest_id(msg: events_pb2.InboundMessage, raw: Msg) -> str:
    # the dedup key; a producer that left it empty still gets exactly-once per stream message
    return msg.ingest_id or f"jsseq:{raw.metadata.sequence.stream}"


@dataclass
class _Job:
    """One INBOUND message in a batch: its span, and the deliveries still to commit."""

    raw: Msg
    msg: events_pb2.InboundMessage
    span: Span
    traceparent: str
    pending: int = 0
    failed: bool = False
    items: list[BatchDelivery] = field(default_factory=list)


class InboundConsumer:
    def __init__(self, mailbox: Mailbox, js: JetStreamContext) -> None:
        self.mb = mailbox
        self.js = js

    # --- one message at a time (the fallback path) ----------------------------------------------
    async def handle(self, msg: events_pb2.InboundMessage, raw: Msg) -> None:
        received = _received_us(msg)
        target = _target(msg)
        ingest_id = _ingest_id(msg, raw)
        for rcpt in dict.fromkeys(msg.rcpt_to):
            try:
                res = await self.mb.resolve_recipient(rcpt, 0)
            except InvalidInput as exc:
                # ingest accepted only valid local recipients; a malformed one must not hold up the rest
                log.error("inbound %s: skipping recipient: %s", msg.ingest_id, exc.message)
                continue
            if not res.user_id:
                # accepted at RCPT time but gone since: keep a trace, nothing to deliver into
                log.error("inbound %s: recipient %s no longer exists; not delivered", msg.ingest_id, rcpt)
                continue
            try:
                m, dup = await self.mb.deliver(res.user_id, ingest_id, msg.blob_ref, target,
                                               msg.spam.score if msg.HasField("spam") else 0.0, received,
                                               enforce_quota=False)
            except NotFound as exc:
                log.error("inbound %s for %s: %s", msg.ingest_id, rcpt, exc.message)
                continue
            log.info("delivered", extra={"ingest_id": ingest_id, "user_id": res.user_id,
                                         "message_id": m.id, "duplicate": dup})

    async def _handle_alone(self, job: _Job) -> None:
        """`handle` with the consumer's ack rules: ack after it returns, nak on failure."""
        with trace.use_span(job.span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            try:
                await self.handle(job.msg, job.raw)
            except Unavailable as exc:
                log.warning("temporary failure delivering %s: %s; redelivery in %.1fs", job.msg.ingest_id,
                            exc.message, NAK_DELAY_S)
                await _settle(job.raw.nak(delay=NAK_DELAY_S))
                return
            except MailmeshError as exc:
                log.error("failed delivering %s: %s", job.msg.ingest_id, exc.message)
                job.span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                await _settle(job.raw.nak(delay=NAK_DELAY_S * 10))
                return
            except Exception:
                log.exception("unexpected error delivering %s", job.msg.ingest_id)
                job.span.set_status(Status(StatusCode.ERROR, "unexpected error"))
                await _settle(job.raw.nak(delay=NAK_DELAY_S * 10))
                return
            await _ack(job.raw)

    # --- batches --------------------------------------------------------------------------------
    async def _prepare(self, jobs: list[_Job]) -> None:
        """Resolves every recipient of the batch (one read), touches each blob, builds each
        message's record input; fills job.items. A job whose blob is missing or whose recipients
        are all gone gets no items (acked, with an error logged, as `handle` does)."""
        resolved = await self.mb.resolve_recipients(r for j in jobs for r in j.msg.rcpt_to)
        refs = list(dict.fromkeys(j.msg.blob_ref for j in jobs))

        async def touch(ref: str) -> bool:
            try:
                blobstore.validate_ref(ref)
            except InvalidInput:
                return False
            # touched: blob collection leaves it alone until well after this reference commits
            return await self.mb.blobs.touch(ref)

        present = dict(zip(refs, await asyncio.gather(*(touch(r) for r in refs)), strict=True))
        for job in jobs:
            msg = job.msg
            users: list[str] = []
            for rcpt in dict.fromkeys(msg.rcpt_to):
                res = resolved.get(rcpt)
                if isinstance(res, str):
                    log.error("inbound %s: skipping recipient: %s", msg.ingest_id, res)
                elif res is None or not res.user_id:
                    log.error("inbound %s: recipient %s no longer exists; not delivered", msg.ingest_id, rcpt)
                elif res.user_id not in users:
                    users.append(res.user_id)
            if not users:
                continue
            if not present.get(msg.blob_ref):
                log.error("inbound %s: blob %s not found; not delivered", msg.ingest_id, msg.blob_ref)
                continue
            label = "SPAM" if _target(msg) == pb.DELIVERY_TARGET_SPAM else "INBOX"
            score = msg.spam.score if msg.HasField("spam") else 0.0
            received = _received_us(msg)
            if msg.HasField("parsed"):
                parsed = parsed_from_summary(msg.parsed, msg.size)
                new = messages.NewMessage(
                    blob_ref=msg.blob_ref, size=msg.size or 0, parsed=parsed, chain=mime.reference_chain(parsed),
                    participants=mime.participants(parsed), norm_subject=mime.normalize_subject(parsed.subject),
                    internal_us=received or now_us(), label_ids=[label], unread=True, spam_score=score)
                job.span.set_attribute("mailmesh.parsed_at_ingest", True)
            else:
                new = await self.mb.new_message(msg.blob_ref, None, label_ids=[label], unread=True,
                                                internal_us=received, spam_score=score)
            ingest_id = _ingest_id(msg, job.raw)
            job.items = [BatchDelivery(u, ingest_id, new, job.traceparent) for u in users]

    async def handle_batch(self, raws: list[Msg], *, after: asyncio.Future[None] | None = None,
                           ready: asyncio.Event | None = None) -> None:
        """Delivers a fetched batch; acks each message once all its deliveries committed. With
        `after`, the batch is prepared at once but written only when `after` (the previous
        batch) is done, so one batch's reads overlap the previous one's commit. `ready` is set
        once the batch starts writing (or is done)."""
        try:
            await self._handle_batch(raws, after, ready)
        finally:
            if ready is not None:
                ready.set()

    async def _handle_batch(self, raws: list[Msg], after: asyncio.Future[None] | None,
                            ready: asyncio.Event | None) -> None:
        jobs: list[_Job] = []
        tracer = telemetry.tracer("svc_mailbox.delivery")
        for raw in raws:
            span = tracer.start_span(
                f"{streams.INBOUND.name.lower()}.consume", context=telemetry.extract_context(raw.headers or {}),
                kind=SpanKind.CONSUMER, attributes={"messaging.system": "nats",
                                                    "messaging.destination.name": raw.subject,
                                                    "messaging.consumer.group.name": DURABLE,
                                                    "messaging.batch.message_count": len(raws)})
            try:
                payload = events_pb2.InboundMessage.FromString(raw.data)
            except Exception:
                log.error("terminating undecodable message on %s", raw.subject)
                span.set_attribute("mailmesh.terminated", True)
                span.end()
                await _settle(raw.term())
                continue
            span.set_attribute("mailmesh.ingest_id", payload.ingest_id)
            jobs.append(_Job(raw, payload, span, telemetry.traceparent(span)))
        if not jobs:
            if after is not None:
                await asyncio.wait([after])
            return
        try:
            try:
                await self._prepare(jobs)
            except Unavailable as exc:
                log.warning("temporary failure preparing %d deliveries: %s; redelivery in %.1fs", len(jobs),
                            exc.message, NAK_DELAY_S)
                await asyncio.gather(*(_settle(j.raw.nak(delay=NAK_DELAY_S)) for j in jobs))
                return
            except Exception:
                log.exception("preparing a batch failed; delivering its messages one by one")
                if after is not None:
                    await asyncio.wait([after])
                for job in jobs:
                    await self._handle_alone(job)
                return
            finally:
                if after is not None and not after.done():
                    await asyncio.wait([after])
            if ready is not None:
                ready.set()
            await self._commit(jobs)
        finally:
            for job in jobs:
                if job.span.is_recording():
                    job.span.end()

    async def _commit(self, jobs: list[_Job]) -> None:
        chunks: list[list[tuple[_Job, BatchDelivery]]] = [[]]
        for job in jobs:
            job.pending = len(job.items)
            for item in job.items:
                if len(chunks[-1]) >= MAX_DELIVERIES_PER_TXN:
                    chunks.append([])
                chunks[-1].append((job, item))
        unavailable = False
        for chunk in chunks:
            if not chunk:
                continue
            if unavailable:
                for job, _ in chunk:
                    job.failed = True
                continue
            try:
                results = await self.mb.deliver_batch([item for _, item in chunk])
            except Unavailable as exc:
                # the store is down: every message not yet committed waits for redelivery
                log.warning("temporary failure delivering a batch: %s; redelivery in %.1fs", exc.message,
                            NAK_DELAY_S)
                unavailable = True
                for job, _ in chunk:
                    job.failed = True
                continue
            except Exception as exc:
                log.warning("batch delivery failed (%s); its messages are delivered one by one",
                            exc.message if isinstance(exc, MailmeshError) else type(exc).__name__)
                for job, _ in chunk:
                    job.failed = True
                continue
            for (job, item), res in zip(chunk, results, strict=True):
                job.pending -= 1
                if res is None:
                    log.error("inbound %s: user %s no longer exists; not delivered", job.msg.ingest_id, item.user)
                    continue
                m, dup = res
                log.info("delivered", extra={"ingest_id": item.ingest_id, "user_id": item.user,
                                             "message_id": m.id, "duplicate": dup})
        acks = []
        for job in jobs:
            if not job.failed:
                # the delivery span ends with its commit, before the EVENTS relay can publish
                job.span.end()
                acks.append(_ack(job.raw))
            elif unavailable:
                acks.append(_settle(job.raw.nak(delay=NAK_DELAY_S)))
        await asyncio.gather(*acks)
        if not unavailable:
            for job in jobs:
                if job.failed:
                    await self._handle_alone(job)

    async def run(self, stop: asyncio.Event) -> None:
        cfg = js_api.ConsumerConfig(durable_name=DURABLE, ack_policy=js_api.AckPolicy.EXPLICIT, ack_wait=60.0,
                                    max_ack_pending=1024, max_deliver=-1)
        sub = await self.js.pull_subscribe(streams.INBOUND.subjects[0], durable=DURABLE,
                                           stream=streams.INBOUND.name, config=cfg)
        # two batches in flight: one being written while the next is prepared. The next batch is
        # fetched only once the previous one starts writing, so the messages that arrive while
        # it is prepared join the next batch: larger batches, fewer transactions (and EVENTS
        # relay passes) per message when mail keeps coming, no wait when it does not.
        inflight: collections.deque[tuple[asyncio.Task[None], asyncio.Event]] = collections.deque()
        try:
            while not stop.is_set():
                while len(inflight) >= 2 or (inflight and inflight[0][0].done()):
                    await _finished(inflight.popleft()[0])
                if inflight:
                    await inflight[-1][1].wait()
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except Exception as exc:
                    if stop.is_set():
                        break
                    log.warning("fetch from %s failed: %s", streams.INBOUND.name, exc)
                    await asyncio.sleep(0.5)
                    continue
                previous = inflight[-1][0] if inflight else None
                ready = asyncio.Event()
                inflight.append((asyncio.create_task(self.handle_batch(msgs, after=previous, ready=ready)), ready))
        finally:
            while inflight:
                await _finished(inflight.popleft()[0])
            try:
                await sub.unsubscribe()
            except Exception:
                pass


async def _finished(task: asyncio.Task[None]) -> None:
    """Awaits a batch; a bug in it is logged (its messages are redelivered after ack_wait)."""
    try:
        await task
    except Exception:
        log.exception("delivering a batch failed")


async def _ack(raw: Msg) -> None:
    # after the commit; an ack lost on the way only means a redelivery, which is deduplicated
    try:
        await raw.ack()
    except Exception as exc:  # NATS went away after the commit: redelivery is deduplicated
        log.warning("ack on %s not confirmed (%s); it may be redelivered", raw.subject, exc.__class__.__name__)


async def _settle(aw: object) -> None:
    """Awaits a nak/term; a connection lost meanwhile only means a later redelivery."""
    try:
        await aw  # type: ignore[misc]
    except Exception as exc:
        log.warning("nak/term not sent (%s); the message will be redelivered", exc.__class__.__name__)
