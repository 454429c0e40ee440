"""The sending pipeline shared by the API (Send) and SMTP submission: limits, routing, the
delivery copy (trace header, DKIM), the SENT copy, the durable hold, and the release to
INBOUND (local recipients) and OUTBOUND (one job per remote domain).

A recipient in a local domain without that mailbox does not fail the whole message (as Gmail
and Postfix's bounce do): the other recipients get it, the unknown one is marked `bounced` on
the SENT copy and the sender gets a DSN (RFC 3464) naming it, at release (so an undone send
bounces nothing). SMTP submission refuses such a recipient already at RCPT with 550 5.1.1
(submission.py), which a desktop client shows at once, like Postfix's reject_unlisted_recipient.

Durability (DESIGN "Durability"): when `send`/`submit` return, the signed delivery copy is in
the blob store, the SENT copy in the mailbox and the held send in the send store; everything
after that is retried until done. The release keeps the trace context of the request, so a
delivery attempt days later still belongs to the trace of the Send that caused it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Generic, TypeVar

from mailmesh.v1 import events_pb2, types_pb2
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import send_service_pb2 as spb
from nats.js import JetStreamContext

from mailmesh_common import address, streams, telemetry
from mailmesh_common.address import MailAddress
from mailmesh_common.blobstore import BlobStore
from mailmesh_common.config import Settings
from mailmesh_common.errors import FailedPrecondition, InvalidInput, MailmeshError, NotFound
from mailmesh_common.mailboxclient import MailboxClient
from mailmesh_common.mime import compose
from svc_send import limits
from svc_send.dkim_sign import Signer
from svc_send.dsn import build_dsn
from svc_send.queue import GEN_HEADER, QueueStore, dsn_key
from svc_send.schedule import Due, HeldSends
from svc_send.store import RETENTION_S, now_us, ts, us_of

log = logging.getLogger(__name__)

MAX_SCHEDULE_AHEAD_S = 366 * 86400
MAX_IDEMPOTENCY_KEY = 200
PURGE_EVERY_S = 600.0
LOCAL_DELIVERED = "250 2.0.0 delivered to the local mailbox"
# Two mailbox calls per message saved: the sender's account (display name, addresses) is reused
# for a few seconds, and so is the answer "this domain is not local" (a domain made local is
# routed locally after at most FOREIGN_DOMAIN_CACHE_S)
ACCOUNT_CACHE_S = 5.0
FOREIGN_DOMAIN_CACHE_S = 10.0
MAX_CACHED = 10_000

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """A small bounded cache whose entries expire ttl_s after they were put."""

    def __init__(self, ttl_s: float, max_entries: int = MAX_CACHED) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._items: dict[K, tuple[float, V]] = {}

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if time.monotonic() - item[0] >= self.ttl_s:
            self._items.pop(key, None)
            return None
        return item[1]

    def put(self, key: K, value: V) -> None:
        if len(self._items) >= self.max_entries:
            self._items.clear()
        self._items[key] = (time.monotonic(), value)


def unknown_reply(rcpt: str) -> str:
    """What a recipient in a local domain without that mailbox gets (RFC 3463 5.1.1)."""
    return f"550 5.1.1 <{rcpt}>: no such user here"


@dataclass
class Route:
    """Where the recipients of one message go."""

    local: list[str] = field(default_factory=list)  # local mailboxes: INBOUND
    unknown: list[str] = field(default_factory=list)  # local domain, no such mailbox: bounced with a DSN
    remote: dict[str, list[str]] = field(default_factory=dict)  # by A-label domain: OUTBOUND


@dataclass(frozen=True)
class Accepted:
    """A send that is durably accepted."""

    send: spb.StoredSend
    message: types_pb2.Message  # the SENT copy (MINIMAL)


def _utc(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


class Outbox:
    def __init__(self, settings: Settings, js: JetStreamContext, mailbox: MailboxClient, blobs: BlobStore,
                 held: HeldSends, queue: QueueStore, signer: Signer, hostname: str) -> None:
        self.settings = settings
        self.js = js
        self.mailbox = mailbox
        self.blobs = blobs
        self.held = held
        self.queue = queue
        self.signer = signer
        self.hostname = hostname
        self._wake = asyncio.Event()
        self._backoff: dict[str, tuple[float, float]] = {}  # send_id -> (retry at, last delay)
        self._accounts: TtlCache[str, types_pb2.Account] = TtlCache(ACCOUNT_CACHE_S)
        self._foreign: TtlCache[str, bool] = TtlCache(FOREIGN_DOMAIN_CACHE_S)

    # --- the API ------------------------------------------------------------------------------
    async def send(self, user: str, req: spb.SendRequest) -> Accepted:
        idem = req.idempotency_key
        if len(idem) > MAX_IDEMPOTENCY_KEY:
            raise InvalidInput(f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters")
        if idem:
            prior = await self.held.find_idempotent(user, idem)
            if prior is not None:
                return Accepted(prior, types_pb2.Message(id=prior.message_id, thread_id=prior.send.thread_id))
        account = self._accounts.get(user)
        if account is None:
            account = await self.mailbox.get_account(user)
            self._accounts.put(user, account)
        from_email = self._from_address(account, req.from_email)
        draft = compose.Draft(sender=MailAddress(account.display_name, from_email))
        for name in ("to", "cc", "bcc", "reply_to"):
            getattr(draft, name).extend(compose.mail_address(a.name, a.email, field_name=name)
                                        for a in getattr(req, name))
        draft.subject, draft.text, draft.html = req.subject, req.text_body, req.html_body
        recipients = _unique(a.email for a in (*draft.to, *draft.cc, *draft.bcc))
        limits.check_recipients(len(recipients), self.settings)
        attached = sum(len(a.data) for a in req.attachments) + len(req.text_body) + len(req.html_body)
        limits.check_size(attached, self.settings)
        draft.attachments = [compose.AttachmentIn(a.filename, a.data, a.mime_type, a.content_id, a.inline)
                             for a in req.attachments]
        if req.reply_to_message_id:
            try:
                draft.parent = await self.mailbox.get_message(user, req.reply_to_message_id)
            except NotFound:
                raise NotFound("reply_to_message_id: no such message in the sender's mailbox") from None
        now = now_us()
        send_at = self._send_time(req, now)
        composed = compose.compose(draft, message_id=compose.new_message_id(address.split(from_email)[1]),
                                   date=_utc(max(now, send_at)))
        return await self._accept(user, from_email, composed.sent_raw, composed.delivery_raw, recipients,
                                  composed.message_id, composed.subject, send_at, idem, protocol="HTTP")

    @staticmethod
    def _from_address(account: types_pb2.Account, wanted: str) -> str:
        if not wanted:
            return account.email
        try:
            key = address.canonical(wanted)
        except InvalidInput:
            raise InvalidInput(f"from_email {wanted!r} is not an address") from None
        for a in account.addresses or [account.email]:
            with contextlib.suppress(InvalidInput):
                if address.canonical(a) == key:
                    return a
        raise InvalidInput(f"from_email {wanted!r} is not one of the account's addresses")

    def _send_time(self, req: spb.SendRequest, now: int) -> int:
        if not req.HasField("send_time"):
            return 0
        at = us_of(req.send_time)
        if at > now + MAX_SCHEDULE_AHEAD_S * 1_000_000:
            raise InvalidInput("send_time is more than a year ahead")
        return at

    # --- SMTP submission -------------------------------------------------------------------------
    async def submit(self, user: str, mail_from: str, rcpts: list[str], raw: bytes, *, helo: str,
                     client_ip: str, account: types_pb2.Account) -> Accepted:
        """A message an authenticated client submitted: relayed as it came, with Message-ID and
        Date added when missing (RFC 6409 8.2, 8.3) and Bcc removed from the delivered copy.
        Released at once: a desktop client has no undo button to wait for."""
        raw = compose.normalize_line_ends(raw)
        domain = address.split(mail_from)[1]
        added = []
        ids = compose.header_values(raw, "Message-ID")
        message_id = ids[0].strip().strip("<>").strip() if ids else ""
        if not message_id:
            message_id = compose.new_message_id(domain)
            added.append(f"Message-ID: <{message_id}>")
        if not compose.header_values(raw, "Date"):
            added.append(f"Date: {format_datetime(datetime.now(UTC))}")
        if not compose.header_values(raw, "From"):
            name = account.display_name.replace('"', "")
            added.append(f'From: "{name}" <{mail_from}>' if name else f"From: <{mail_from}>")
        sent_raw = compose.prepend_headers(raw, added) if added else raw
        delivery_raw = compose.remove_headers(sent_raw, ["Bcc", "Resent-Bcc"])
        subjects = compose.header_values(raw, "Subject")
        rcpts = _unique(rcpts)
        limits.check_recipients(len(rcpts), self.settings)
        return await self._accept(user, mail_from, sent_raw, delivery_raw, rcpts, message_id,
                                  subjects[0] if subjects else "", 0, "", protocol="ESMTPSA", helo=helo,
                                  client_ip=client_ip, undo=False)

    # --- accepting ------------------------------------------------------------------------------
    async def _route(self, rcpts: list[str]) -> Route:
        """Local recipients, unknown ones (a local domain without that mailbox) and remote ones by
        A-label domain."""
        domains = [address.split(r)[1] for r in rcpts]
        ask = [r for r, d in zip(rcpts, domains, strict=True) if not self._foreign.get(d.lower())]
        answers = dict(zip(ask, await asyncio.gather(*(self.mailbox.resolve(r) for r in ask)), strict=True))
        route = Route()
        remote: dict[str, list[str]] = defaultdict(list)
        for rcpt, domain in zip(rcpts, domains, strict=True):
            res = answers.get(rcpt)
            if res is None:
                remote[domain].append(rcpt)
            elif res.resolution in (mpb.RECIPIENT_RESOLUTION_LOCAL_USER, mpb.RECIPIENT_RESOLUTION_OVER_QUOTA):
                route.local.append(rcpt)
            elif res.resolution == mpb.RECIPIENT_RESOLUTION_UNKNOWN_USER:
                route.unknown.append(rcpt)
            else:
                remote[domain].append(rcpt)
                if res.resolution == mpb.RECIPIENT_RESOLUTION_FOREIGN_DOMAIN:
                    self._foreign.put(domain.lower(), True)
        route.remote = dict(remote)
        return route

    async def _accept(self, user: str, from_email: str, sent_raw: bytes, delivery_raw: bytes, rcpts: list[str],
                      message_id: str, subject: str, send_at: int, idem: str, *, protocol: str, helo: str = "",
                      client_ip: str = "", undo: bool = True) -> Accepted:
        limits.check_size(len(sent_raw), self.settings)
        now = now_us()
        await limits.check_daily(self.held, user, now, self.settings)
        route = await self._route(rcpts)
        # from here on the request is carried through even if its caller goes away: a SENT copy
        # without its held send would never be delivered
        return await asyncio.shield(self._commit(user, from_email, sent_raw, delivery_raw, rcpts, route,
                                                 message_id, subject, send_at, idem, now, protocol=protocol,
                                                 helo=helo, client_ip=client_ip, undo=undo))

    async def _commit(self, user: str, from_email: str, sent_raw: bytes, delivery_raw: bytes, rcpts: list[str],
                      route: Route, message_id: str, subject: str, send_at: int,
                      idem: str, now: int, *, protocol: str, helo: str, client_ip: str, undo: bool) -> Accepted:
        """Signed blob, SENT copy, held send; then the release when there is no hold."""
        local, remote = route.local, route.remote
        send_id = uuid.uuid4().hex
        scheduled = send_at > now
        release = send_at if scheduled else now + int(self.settings.undo_send_s * 1e6 if undo else 0)
        received = compose.received_header(self.hostname, protocol=protocol, send_id=send_id, date=_utc(now),
                                           helo=helo, client_ip=client_ip)
        from_domain = address.split(from_email)[1]
        signed, _ = await self.signer.sign(compose.prepend_headers(delivery_raw, [received]), from_domain)
        blob_ref = await self.blobs.put(signed)
        try:
            sent = await self.mailbox.append(user, sent_raw, ["SENT"], unread=False,
                                             idempotency_key=f"send:{idem or send_id}", track_recipients=rcpts)
            if sent.message_id_header and sent.message_id_header != message_id:
                # an earlier request with this idempotency key stored its copy, then failed: send that one
                first = await self.mailbox.get_message(user, sent.id, types_pb2.MESSAGE_FORMAT_RAW)
                again = compose.remove_headers(compose.normalize_line_ends(first.raw), ["Bcc", "Resent-Bcc"])
                signed, _ = await self.signer.sign(compose.prepend_headers(again, [received]), from_domain)
                await self.blobs.delete(blob_ref)
                blob_ref = await self.blobs.put(signed)
        except BaseException:
            with contextlib.suppress(MailmeshError):
                await self.blobs.delete(blob_ref)
            raise
        rec = spb.StoredSend(
            send=spb.ScheduledSend(name=f"users/{user}/messages/{sent.id}", send_id=send_id, thread_id=sent.thread_id,
                                   subject=subject[:500], recipients=rcpts, send_time=ts(release), create_time=ts(now),
                                   status=spb.SEND_STATUS_SCHEDULED if scheduled else spb.SEND_STATUS_QUEUED),
            sender_user_id=user, message_id=sent.id,
            traceparent=telemetry.inject_headers().get("traceparent", ""), local_recipients=local,
            open_jobs=len(remote), idempotency_key=idem, size=len(signed), blob_ref=blob_ref,
            unknown_recipients=route.unknown, mail_from=from_email)
        if local:
            rec.inbound.CopyFrom(events_pb2.InboundMessage(
                ingest_id=f"send-{send_id}", mail_from=from_email, rcpt_to=local, blob_ref=blob_ref, size=len(signed),
                source=events_pb2.MESSAGE_SOURCE_SUBMISSION, sender_user_id=user, remote_ip=client_ip, helo=helo))
        for n, (domain, addrs) in enumerate(sorted(remote.items()), start=1):
            rec.outbound.add(job_id=f"{send_id}-{n}", sender_user_id=user, message_id=sent.id, blob_ref=blob_ref,
                             mail_from=from_email, domain=domain, rcpt_to=addrs)
        immediate = release <= now
        try:
            stored = await self.held.hold(rec, idem, now, release_now=immediate)
        except BaseException:  # not held: a retry composes (and signs) again
            with contextlib.suppress(MailmeshError):
                await self.blobs.delete(blob_ref)
            raise
        if stored.send.send_id != send_id:  # a concurrent request with the same key won
            with contextlib.suppress(MailmeshError):
                await self.blobs.delete(blob_ref)
            return Accepted(stored, types_pb2.Message(id=stored.message_id, thread_id=stored.send.thread_id))
        log.info("send accepted", extra={"send_id": send_id, "user_id": user, "message_id": sent.id,
                                         "local": len(local), "unknown": len(route.unknown),
                                         "remote_domains": len(remote)})
        if immediate:  # claimed in the hold's transaction: publish now
            try:
                await self._publish(stored, Due(release, send_id), now)
            except MailmeshError as exc:  # durable already (in the due index): the scheduler retries
                log.warning("send %s: release failed, will retry: %s", send_id, exc.message)
                self._wake.set()
        else:
            self._wake.set()
        return Accepted(rec, sent)  # as accepted: QUEUED (the release may have begun already)

    # --- releasing ------------------------------------------------------------------------------
    async def release(self, due: Due) -> None:
        """Publishes a held send whose time has come (safe to repeat)."""
        now = now_us()
        await self._publish(await self.held.claim_release(due.send_id, now), due, now)

    async def _publish(self, rec: spb.StoredSend | None, due: Due, now: int) -> None:
        """The release of a claimed send: INBOUND, OUTBOUND, the recipients' states; then out of
        the due index. `rec` None: cancelled or gone, only the index entry goes."""
        if rec is None:
            await self.held.finish_release(due, now)
            return
        ctx = telemetry.extract_context({"traceparent": rec.traceparent} if rec.traceparent else {})
        with telemetry.tracer("svc_send").start_as_current_span(
                "send.release", context=ctx, attributes={"mailmesh.send_id": rec.send.send_id,
                                                         "mailmesh.jobs": len(rec.outbound),
                                                         "mailmesh.unknown_rcpt_count": len(rec.unknown_recipients)}):
            if rec.unknown_recipients:  # first: a finished remote delivery may remove the blob
                await self._bounce_unknown(rec, now)
            if rec.HasField("inbound") and rec.inbound.rcpt_to:
                await streams.publish(self.js, streams.inbound_subject(rec.inbound.ingest_id), rec.inbound,
                                      msg_id=rec.inbound.ingest_id)
            for job in rec.outbound:
                await streams.publish(self.js, streams.outbound_subject(job.domain), job, msg_id=job.job_id,
                                      headers={GEN_HEADER: "0"})
            states = [types_pb2.RecipientStatus(email=r, state=types_pb2.RECIPIENT_STATE_DELIVERED, attempts=1,
                                                last_reply=LOCAL_DELIVERED, updated_time=ts(now))
                      for r in rec.local_recipients]
            states += [types_pb2.RecipientStatus(email=r, state=types_pb2.RECIPIENT_STATE_BOUNCED, attempts=1,
                                                 last_reply=unknown_reply(r), updated_time=ts(now))
                       for r in rec.unknown_recipients]
            if states:
                with contextlib.suppress(NotFound):  # the sender deleted the message meanwhile
                    await self.mailbox.update_status(rec.sender_user_id, rec.message_id, states)
        if rec.unknown_recipients and not rec.local_recipients and not rec.outbound and rec.blob_ref:
            with contextlib.suppress(MailmeshError):  # nobody will read the signed copy
                await self.blobs.delete(rec.blob_ref)
        await self.held.finish_release(due, now)
        self._backoff.pop(due.send_id, None)

    async def _bounce_unknown(self, rec: spb.StoredSend, now: int) -> None:
        """The DSN (RFC 3464) for recipients in a local domain without such a mailbox, in the
        sender's INBOX; idempotent (a repeated release appends nothing new)."""
        if not rec.mail_from:  # RFC 3464 2: never a bounce for the null sender
            return
        entry = spb.QueueEntry(id=rec.send.send_id, mail_from=rec.mail_from, subject=rec.send.subject,
                               create_time=rec.send.create_time, message=rec.send.name)
        failed = [types_pb2.RecipientStatus(email=r, state=types_pb2.RECIPIENT_STATE_BOUNCED, attempts=1,
                                            last_reply=unknown_reply(r), updated_time=ts(now))
                  for r in rec.unknown_recipients]
        with telemetry.tracer("svc_send").start_as_current_span("send.bounce", attributes={
                "mailmesh.send_id": rec.send.send_id, "mailmesh.rcpt_count": len(failed),
                "mailmesh.bounce.reason": "unknown local recipient"}):
            head = await self._original_head(rec.blob_ref)
            raw = build_dsn(entry, failed, head, reporting_mta=self.hostname)
            with contextlib.suppress(NotFound):  # the sender's account is gone
                await self.mailbox.append(rec.sender_user_id, raw, ["INBOX"], unread=True,
                                          idempotency_key=dsn_key(rec.send.send_id, list(rec.unknown_recipients)))
        log.info("bounce", extra={"send_id": rec.send.send_id, "recipients": len(failed),
                                  "user_id": rec.sender_user_id, "reason": "unknown local recipient"})

    async def _original_head(self, blob_ref: str) -> bytes:
        """The header of the signed copy (for the DSN); empty when it is gone."""
        if not blob_ref:
            return b""
        try:
            data = await self.blobs.get(blob_ref)
        except MailmeshError:
            return b""
        return compose.split_head(data)[0]

    async def cancel(self, user: str, message_id: str) -> types_pb2.Message:
        """CancelSend: a held send is not released and its message moves from SENT to DRAFTS."""
        try:
            rec = await self.held.cancel(user, message_id, now_us())
        except NotFound:
            await self.mailbox.get_message(user, message_id, types_pb2.MESSAGE_FORMAT_MINIMAL)  # NotFound stays
            raise FailedPrecondition("the message was sent already; it can no longer be cancelled") from None
        [moved] = await self.mailbox.modify(user, [message_id], add=["DRAFTS"], remove=["SENT"])
        if rec.blob_ref:
            with contextlib.suppress(MailmeshError):
                await self.blobs.delete(rec.blob_ref)
        log.info("send cancelled", extra={"send_id": rec.send.send_id, "user_id": user, "message_id": message_id})
        return moved

    async def run_scheduler(self, stop: asyncio.Event) -> None:
        """Releases held sends when their time comes; purges old bookkeeping now and then."""
        last_purge = 0.0
        while not stop.is_set():
            self._wake.clear()
            wait = 1.0
            try:
                dues = await self.held.due(now_us())
                for due in dues:
                    retry_at, delay = self._backoff.get(due.send_id, (0.0, 0.0))
                    if retry_at > time.monotonic():
                        wait = min(wait, max(0.05, retry_at - time.monotonic()))
                        continue
                    try:
                        await self.release(due)
                    except MailmeshError as exc:
                        delay = min(max(delay * 2, 0.5), 30.0)
                        self._backoff[due.send_id] = (time.monotonic() + delay, delay)
                        log.warning("send %s: release failed, retry in %.1fs: %s", due.send_id, delay, exc.message)
                        wait = min(wait, delay)
                if time.monotonic() - last_purge > PURGE_EVERY_S:
                    last_purge = time.monotonic()
                    cutoff = now_us() - RETENTION_S * 1_000_000
                    await self.held.purge(cutoff)
                    await self.queue.purge(cutoff)
                nxt = await self.held.next_release()
                if len(dues) >= 100:
                    wait = 0.0  # more are due
                elif nxt is not None:
                    wait = min(wait, max(0.05, (nxt - now_us()) / 1e6))
            except MailmeshError as exc:
                log.warning("scheduler: %s", exc.message)
            if wait <= 0:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(stop, self._wake), wait)


def _unique(addresses: Iterable[str]) -> list[str]:
    """Addresses in order without repeats (compared case-insensitively, as the mailbox tracks them)."""
    seen: dict[str, str] = {}
    for a in addresses:
        seen.setdefault(a.lower(), a)
    return list(seen.values())


async def _first(*events: asyncio.Event) -> None:
    tasks = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


__all__ = ["Accepted", "Outbox"]
