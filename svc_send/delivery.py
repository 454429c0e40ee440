"""Delivery workers: a durable JetStream consumer of OUTBOUND that delivers each job (one
message, the recipients of one remote domain) over SMTP, records per-recipient results, and
retries temporary failures with nak-with-delay along the configured schedule until the job
expires (5 days by default). Permanent failures and expiry become a DSN in the sender's INBOX.

Exactly-once per recipient: a job's lease in the send store keeps two messages of one job from
attempting at once; results are recorded before the message is acked, and a recipient once
DELIVERED or BOUNCED is never attempted again. A worker that stops mid-delivery naks its
messages and gives up its leases; one that dies is taken over when its lease and the message's
ack wait run out (outbound_ack_wait_s). The only window left is SMTP's own (RFC 1047): a reply
to the final dot that never arrives leaves the message deferred, and sent again.

Connections are reused across jobs (RSET between transactions), at most
outbound_per_destination at a time per recipient domain. One span `outbound.attempt` per
attempt, a child of the Send's trace (carried by the message's `traceparent` header).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import nats
from google.protobuf.message import DecodeError
from mailmesh.v1 import events_pb2
from mailmesh.v1 import send_service_pb2 as spb
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from opentelemetry.trace import Status, StatusCode

from mailmesh_common import streams, telemetry
from mailmesh_common.blobstore import BlobStore
from mailmesh_common.config import Settings
from mailmesh_common.dns import Resolver
from mailmesh_common.errors import FailedPrecondition, MailmeshError, NotFound, Unavailable
from mailmesh_common.mailboxclient import MailboxClient
from svc_send import mx
from svc_send.dsn import build_dsn
from svc_send.queue import ACTIVE_STATES, GEN_HEADER, PENDING, QueueStore, RcptResult, dsn_key
from svc_send.smtp_client import (
    NeedsSmtpUtf8,
    Reply,
    SmtpClient,
    SmtpConnectionLost,
    opportunistic_tls_context,
)
from svc_send.store import now_us, us_of

log = logging.getLogger(__name__)

DURABLE = "svc-send-delivery"
MAX_RCPTS_PER_TRANSACTION = 100  # RFC 5321 4.5.3.1.8: servers must take at least 100
IDLE_CONNECTION_S = 5.0
MAX_TRANSACTIONS_PER_CONNECTION = 100
FRESH_S = 1.0  # a pooled connection idle for less than this is reused without an RSET check
DESTINATION_WAIT_S = 10.0
MAX_ACK_PENDING = 1_000_000  # deferred messages wait as pending acks


class ConnectionPool:
    """Idle SMTP connections by (address, port), reused for the next delivery there."""

    def __init__(self, idle_s: float = IDLE_CONNECTION_S) -> None:
        self.idle_s = idle_s
        self._idle: dict[tuple[str, int], list[tuple[SmtpClient, float]]] = {}

    async def take(self, key: tuple[str, int]) -> SmtpClient | None:
        """An idle connection to key. One idle for less than FRESH_S is handed out as it is (a
        finished transaction leaves the server ready for the next MAIL, RFC 5321 3.3: no RSET
        round trip on a busy route); an older one is checked with RSET first. The caller
        retries on a fresh connection when a reused one turns out to be closed."""
        while self._idle.get(key):
            client, since = self._idle[key].pop()
            idle = time.monotonic() - since
            if idle < FRESH_S and not client.broken:
                return client
            if idle < self.idle_s and await client.reset():
                return client
            await client.quit()
        return None

    def give(self, key: tuple[str, int], client: SmtpClient) -> None:
        if client.broken or client.transactions >= MAX_TRANSACTIONS_PER_CONNECTION:
            client.close()
            return
        self._idle.setdefault(key, []).append((client, time.monotonic()))

    async def close_idle(self) -> None:
        now = time.monotonic()
        for key, conns in list(self._idle.items()):
            keep = [(c, t) for c, t in conns if now - t < self.idle_s]
            for c, t in conns:
                if now - t >= self.idle_s:
                    await c.quit()
            if keep:
                self._idle[key] = keep
            else:
                self._idle.pop(key, None)

    async def close_all(self) -> None:
        for conns in self._idle.values():
            for c, _ in conns:
                c.close()
        self._idle.clear()


def _outcome(email: str, reply: Reply) -> RcptResult:
    if 200 <= reply.code < 300:
        return RcptResult(email, "delivered", str(reply))
    if reply.temporary:
        return RcptResult(email, "deferred", str(reply))
    return RcptResult(email, "bounced", str(reply))


def _needs_utf8(mail_from: str, rcpts: list[str]) -> bool:
    return not all(a.isascii() for a in (mail_from, *rcpts))


class Delivery:
    def __init__(self, settings: Settings, js: JetStreamContext, queue: QueueStore, mailbox: MailboxClient,
                 blobs: BlobStore, resolver: Resolver, hostname: str) -> None:
        self.settings = settings
        self.js = js
        self.queue = queue
        self.mailbox = mailbox
        self.blobs = blobs
        self.resolver = resolver
        self.hostname = hostname
        self.owner = uuid.uuid4().hex
        self.pool = ConnectionPool()
        self.tls = opportunistic_tls_context()
        self.lease_s = max(settings.outbound_ack_wait_s, 1.0)
        self._destinations: dict[str, tuple[asyncio.Semaphore, int]] = {}  # domain -> (slots, users)
        self.inflight: set[asyncio.Task[None]] = set()

    # --- the consumer -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        cfg = js_api.ConsumerConfig(durable_name=DURABLE, ack_policy=js_api.AckPolicy.EXPLICIT,
                                    ack_wait=self.settings.outbound_ack_wait_s, max_ack_pending=MAX_ACK_PENDING,
                                    max_deliver=-1, filter_subject=streams.OUTBOUND.subjects[0])
        try:  # create, or update a consumer made with other settings (ack wait)
            await self.js.add_consumer(streams.OUTBOUND.name, config=cfg)
        except Exception as exc:
            log.warning("OUTBOUND consumer %s not updated: %s", DURABLE, exc)
        sub = await self.js.pull_subscribe(streams.OUTBOUND.subjects[0], durable=DURABLE,
                                           stream=streams.OUTBOUND.name, config=cfg)
        reaper = asyncio.create_task(self._reap(stop))
        workers = max(1, self.settings.outbound_workers)
        try:
            while not stop.is_set():
                free = workers - len(self.inflight)
                if free <= 0:
                    await asyncio.wait(set(self.inflight), timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await sub.fetch(min(free, 64), timeout=1.0)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except Exception as exc:
                    if stop.is_set():
                        break
                    log.warning("fetch from OUTBOUND failed: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                for m in msgs:
                    task = asyncio.create_task(self._guarded(m))
                    self.inflight.add(task)
                    task.add_done_callback(self.inflight.discard)
        finally:
            # unsubscribed first: a pull request still open at the server would otherwise take the
            # messages handed back below and hold them for the whole ack wait
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            reaper.cancel()
            for task in list(self.inflight):
                task.cancel()
            await asyncio.gather(*self.inflight, reaper, return_exceptions=True)
            await self.pool.close_all()

    async def _reap(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(1.0)
            await self.pool.close_idle()

    async def _guarded(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
        except asyncio.CancelledError:
            # stopping: hand the message back at once (another worker, or us after a restart)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(msg.nak(), 2)
            raise
        except Exception:
            log.exception("unexpected error delivering %s", msg.subject)
            with contextlib.suppress(Exception):
                await msg.nak(delay=30)

    async def handle(self, msg: Msg) -> None:
        headers = msg.headers or {}
        with telemetry.consumer_span("outbound.consume", headers, {
                "messaging.system": "nats", "messaging.destination.name": msg.subject,
                "messaging.consumer.group.name": DURABLE}):
            try:
                job = events_pb2.OutboundDelivery.FromString(msg.data)
            except DecodeError:
                log.error("terminating undecodable message on %s", msg.subject)
                await msg.term()
                return
            try:
                gen = int(headers.get(GEN_HEADER, "0") or 0)
            except ValueError:
                gen = 0
            try:
                await self._handle_job(job, gen, msg)
            except Unavailable as exc:
                log.warning("job %s: temporary failure, again in 2s: %s", job.job_id, exc.message)
                await msg.nak(delay=2.0)

    async def _handle_job(self, job: events_pb2.OutboundDelivery, gen: int, msg: Msg) -> None:
        claim = None
        for _ in range(3):
            claim = await self.queue.claim(job.job_id, gen, self.owner, now_us(), self.lease_s,
                                           us_of(job.not_before))
            if claim.kind != "sync":
                break
            assert claim.entry is not None
            await self.sync(claim.entry)
        assert claim is not None
        if claim.kind == "drop":
            await msg.ack()
            return
        if claim.kind in ("wait", "sync"):
            await msg.nak(delay=max(claim.delay_s, 0.01) if claim.kind == "wait" else 1.0)
            return
        entry = claim.entry
        assert entry is not None
        recorded = None
        try:
            if not await self._enter_destination(entry.domain):
                await msg.nak(delay=1.0)  # the destination is busy; the lease goes in `finally`
                return
            try:
                async with self._heartbeat(job.job_id, msg):
                    results, remote = await self.attempt(entry)
            finally:
                self._leave_destination(entry.domain)
            recorded = await self.queue.record(job.job_id, self.owner, results, now_us(), remote)
        finally:
            if recorded is None:
                with contextlib.suppress(MailmeshError):
                    await self.queue.release(job.job_id, self.owner)
        # a finished job without bounces is not marked synced (one commit less): only a
        # redelivery of its message (after a crash before the ack) would sync it again, harmlessly
        clean = recorded.finished and not recorded.entry.bounce_pending
        try:
            await self.sync(recorded.entry, mark=not clean)
        except MailmeshError as exc:  # recorded: the next delivery of the message syncs
            log.warning("job %s: recording the states failed: %s", job.job_id, exc.message)
            await msg.nak(delay=2.0)
            return
        if recorded.delete_blob and recorded.entry.blob_ref:
            with contextlib.suppress(MailmeshError):
                await self.blobs.delete(recorded.entry.blob_ref)
        if recorded.finished:
            await msg.ack_sync()
        else:
            delay = max(0.0, (us_of(recorded.entry.next_attempt_time) - now_us()) / 1e6)
            await msg.nak(delay=max(delay, 0.01))

    async def _enter_destination(self, domain: str) -> bool:
        """Waits (bounded) for one of the domain's outbound_per_destination connection slots."""
        sem, users = self._destinations.get(domain) or (
            asyncio.Semaphore(max(1, self.settings.outbound_per_destination)), 0)
        self._destinations[domain] = (sem, users + 1)
        try:
            await asyncio.wait_for(sem.acquire(), DESTINATION_WAIT_S)
        except TimeoutError:
            self._forget_destination(domain)
            return False
        except BaseException:
            self._forget_destination(domain)
            raise
        return True

    def _leave_destination(self, domain: str) -> None:
        self._destinations[domain][0].release()
        self._forget_destination(domain)

    def _forget_destination(self, domain: str) -> None:
        sem, users = self._destinations[domain]
        if users <= 1:
            del self._destinations[domain]  # nobody waits: the map holds only busy destinations
        else:
            self._destinations[domain] = (sem, users - 1)

    @contextlib.asynccontextmanager
    async def _heartbeat(self, job_id: str, msg: Msg) -> AsyncIterator[None]:
        """Keeps the message's ack wait and the job's lease alive while an attempt runs."""
        async def beat() -> None:
            while True:
                await asyncio.sleep(max(self.lease_s / 3, 0.3))
                with contextlib.suppress(Exception):
                    await msg.in_progress()
                with contextlib.suppress(MailmeshError):
                    await self.queue.renew(job_id, self.owner, now_us() + int(self.lease_s * 1e6))

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- one attempt ------------------------------------------------------------------------------
    async def attempt(self, entry: spb.QueueEntry) -> tuple[list[RcptResult], str]:
        """Delivers to the entry's pending recipients; (per-recipient results, remote server)."""
        pending = [r.email for r in entry.recipients if r.state in PENDING]
        tracer = telemetry.tracer("svc_send.delivery")
        with tracer.start_as_current_span("outbound.attempt", attributes={
                "mailmesh.job_id": entry.id, "mailmesh.domain": entry.domain, "mailmesh.attempt": entry.attempts + 1,
                "mailmesh.rcpt_count": len(pending)}) as span:
            results, remote = await self._attempt(entry, pending)
            counts = {k: sum(1 for r in results if r.outcome == k) for k in ("delivered", "deferred", "bounced")}
            for k, v in counts.items():
                span.set_attribute(f"mailmesh.{k}", v)
            if remote:
                span.set_attribute("server.address", remote)
            if counts["deferred"] or counts["bounced"]:
                span.set_status(Status(StatusCode.ERROR, results[-1].reply[:200]))
            log.info("delivery attempt", extra={"job_id": entry.id, "domain": entry.domain, "remote": remote,
                                                "attempt": entry.attempts + 1, **counts})
            return results, remote

    async def _attempt(self, entry: spb.QueueEntry, pending: list[str]) -> tuple[list[RcptResult], str]:
        try:
            data = await self._content(entry)
        except NotFound:
            return [RcptResult(r, "bounced", "554 5.3.0 the message content is no longer available")
                    for r in pending], ""
        try:
            hosts = await mx.resolve(self.resolver, entry.domain)
        except mx.NoMailDomain as exc:
            return [RcptResult(r, "bounced", exc.reply) for r in pending], ""
        except mx.RouteTempError as exc:
            return [RcptResult(r, "deferred", exc.reply) for r in pending], ""
        port = self.settings.outbound_smtp_port
        last = f"451 4.4.1 no mail server of {entry.domain} could be reached"
        for host in hosts:
            for ip in host.addresses:
                key = (ip, port)
                client = await self.pool.take(key)
                reused = client is not None
                while True:
                    if client is None:
                        try:
                            client = await SmtpClient.connect(
                                host.name, ip, port, self.hostname,
                                connect_timeout_s=self.settings.outbound_connect_timeout_s,
                                command_timeout_s=self.settings.outbound_command_timeout_s, tls=self.tls)
                        except SmtpConnectionLost as exc:
                            last = f"451 4.4.1 {exc}"
                            break
                    try:
                        results = await self._transactions(client, entry, pending, data)
                    except BaseException:  # cancelled (stopping): the connection goes with the attempt
                        client.close()
                        raise
                    if results is None and reused:  # the server had closed the pooled connection: anew
                        client.close()
                        client, reused = None, False
                        continue
                    break
                if client is None:
                    continue
                if results is None:  # lost before any transaction began: try the next address
                    last = f"451 4.4.2 connection to {client.peer} was lost"
                    client.close()
                    continue
                self.pool.give(key, client)
                return results, client.peer
        return [RcptResult(r, "deferred", last) for r in pending], ""

    async def _transactions(self, client: SmtpClient, entry: spb.QueueEntry, pending: list[str],
                            data: bytes) -> list[RcptResult] | None:
        results: list[RcptResult] = []
        utf8 = _needs_utf8(entry.mail_from, pending)
        for start in range(0, len(pending), MAX_RCPTS_PER_TRANSACTION):
            chunk = pending[start:start + MAX_RCPTS_PER_TRANSACTION]
            try:
                tx = await client.send(entry.mail_from, chunk, data, smtputf8=utf8)
            except NeedsSmtpUtf8:
                results += [RcptResult(r, "bounced", "553 5.6.7 the recipient's server does not support "
                                                     "internationalized addresses (SMTPUTF8)") for r in chunk]
                continue
            except SmtpConnectionLost as exc:
                if not results and not client.data_sent:  # nothing went out: another connection may try
                    return None
                results += [RcptResult(r, "deferred", f"451 4.4.2 {exc}") for r in pending[start:]]
                client.close()
                return results
            results += [_outcome(r, tx.outcome(r)) for r in chunk]
        return results

    async def _content(self, entry: spb.QueueEntry) -> bytes:
        return await self.blobs.get(entry.blob_ref)

    # --- recording on the SENT message, and bounces -------------------------------------------------
    async def sync(self, entry: spb.QueueEntry, *, mark: bool = True) -> None:
        """Writes the recipients' states to the SENT message and the DSN of new bounces (both
        idempotent), then (with mark) marks the entry synced."""
        user, _, msg_id = entry.message.partition("/messages/")
        user = user.removeprefix("users/")
        try:
            await self.mailbox.update_status(user, msg_id, list(entry.recipients))
        except NotFound:
            pass  # the sender deleted the message (or the account): nothing to record on
        notified = list(entry.bounce_pending)
        if notified and entry.mail_from:
            failed = [r for r in entry.recipients if r.email in notified]
            raw = build_dsn(entry, failed, await self._original_head(entry), reporting_mta=self.hostname)
            try:
                await self.mailbox.append(entry.sender_user_id, raw, ["INBOX"], unread=True,
                                          idempotency_key=dsn_key(entry.id, notified))
            except NotFound:
                pass
            log.info("bounce", extra={"job_id": entry.id, "recipients": len(failed), "user_id": entry.sender_user_id})
        if mark or notified:
            await self.queue.mark_synced(entry.id, entry, notified)

    async def _original_head(self, entry: spb.QueueEntry) -> bytes:
        try:
            f = await asyncio.to_thread(self.blobs.open, entry.blob_ref)
        except MailmeshError:
            return b""
        try:
            return await asyncio.to_thread(f.read, 256 * 1024)
        except OSError:
            return b""
        finally:
            f.close()

    # --- the operator's actions -------------------------------------------------------------------
    async def retry(self, job_id: str) -> spb.QueueEntry:
        """RetryQueueEntry: a message of the next generation makes the next attempt now."""
        entry = await self.queue.get(job_id)
        if entry.state not in ACTIVE_STATES:
            raise FailedPrecondition(f"queue entry {job_id} is finished")
        gen = await self.queue.generation(job_id) + 1
        user = entry.message.removeprefix("users/").partition("/")[0]
        job = events_pb2.OutboundDelivery(
            job_id=job_id, sender_user_id=user, message_id=entry.message.rpartition("/")[2], blob_ref=entry.blob_ref,
            mail_from=entry.mail_from, domain=entry.domain, rcpt_to=[r.email for r in entry.recipients],
            create_time=entry.create_time, recipients=list(entry.recipients))
        # published first: if the update below is lost, this message still carries the job
        await streams.publish(self.js, streams.outbound_subject(entry.domain), job, msg_id=f"{job_id}.{gen}",
                              headers={GEN_HEADER: str(gen)})
        return await self.queue.schedule_now(job_id, gen, now_us())

    async def cancel(self, job_id: str) -> spb.QueueEntry:
        """CancelQueueEntry: pending recipients bounce (DSN), the job's message is dropped."""
        entry, delete_blob = await self.queue.cancel(job_id, now_us())
        try:
            await self.sync(entry)
        except MailmeshError as exc:  # the job's message syncs when it comes back
            log.warning("job %s cancelled; recording the states failed: %s", job_id, exc.message)
        if delete_blob and entry.blob_ref:
            with contextlib.suppress(MailmeshError):
                await self.blobs.delete(entry.blob_ref)
        return await self.queue.get(job_id)


__all__ = ["DURABLE", "ConnectionPool", "Delivery"]
