"""The mailbox: async operations over the KV store and the blob store, used by the gRPC
servicer and the INBOUND consumer. Parsing and blob I/O happen outside transactions; each
operation is one transaction (or, for long ones, a resumable sequence of small ones)."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import types_pb2

from mailmesh_common import address, blobstore, mime, telemetry
from mailmesh_common.blobstore import BlobStore
from mailmesh_common.config import Settings
from mailmesh_common.errors import InvalidInput, LimitExceeded, MailmeshError, NotFound, Unauthenticated
from mailmesh_common.kv import Database, Transaction
from svc_mailbox import accounts, changelog, index, jobs, keys, labels, messages
from svc_mailbox.changelog import ChangeHub
from svc_mailbox.pagetoken import Cursor, PageTokens
from svc_mailbox.txn import MailTx, now_us

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PAGE = 50
ATTACHMENT_CHUNK = 64 * 1024
PARSED_CACHE_ENTRIES = 256
PARSED_CACHE_BYTES = 64 * 1024 * 1024
MAX_UID_SCAN = 5000  # UID entries ListLabelUids examines per call when filtering by CHANGEDSINCE
MINIMAL_FIELDS = ("id", "thread_id", "label_ids", "unread", "starred", "keywords", "snippet", "size_estimate",
                  "internal_date", "history_id", "uids", "blob_ref", "spam_score", "parse_warnings")

_REPEATED = {"label_ids", "keywords", "parse_warnings"}


def page_size(value: int, default: int = DEFAULT_PAGE, maximum: int = messages.MAX_PAGE) -> int:
    if value < 0:
        raise InvalidInput("page_size must not be negative")
    return min(value or default, maximum)


def check_format(fmt: int) -> int:
    """The requested MessageFormat (UNSPECIFIED means METADATA); InvalidInput for unknown values."""
    if fmt not in types_pb2.MessageFormat.values():
        raise InvalidInput(f"format: unknown message format {fmt}")
    return fmt or types_pb2.MESSAGE_FORMAT_METADATA


def render(m: types_pb2.Message, fmt: int) -> types_pb2.Message:
    if fmt in (types_pb2.MESSAGE_FORMAT_MINIMAL, types_pb2.MESSAGE_FORMAT_RAW):
        out = types_pb2.Message()
        for name in MINIMAL_FIELDS:
            if name == "uids":
                for k, v in m.uids.items():
                    out.uids[k] = v
            elif name in _REPEATED:
                getattr(out, name).extend(getattr(m, name))
            elif name == "internal_date":
                out.internal_date.CopyFrom(m.internal_date)
            else:
                setattr(out, name, getattr(m, name))
        return out
    return m


@dataclass(frozen=True)
class BatchDelivery:
    """One recipient's copy of an inbound message, for `Mailbox.deliver_batch`."""

    user: str
    ingest_id: str
    new: messages.NewMessage
    traceparent: str = ""  # the trace its changelog entry (and EVENTS message) continues


class Mailbox:
    def __init__(self, db: Database, blobs: BlobStore, settings: Settings, hub: ChangeHub | None = None) -> None:
        self.db = db
        self.blobs = blobs
        self.settings = settings
        self.hub = hub or ChangeHub()
        self.tokens = PageTokens(settings.token())
        self._parsed: OrderedDict[str, mime.ParsedMessage] = OrderedDict()
        self._parsed_bytes = 0

    # --- transactions -----------------------------------------------------------------------
    async def write(self, user: str, fn: Callable[[MailTx], T]) -> T:
        holder: dict[str, MailTx] = {}
        # captured here: the transaction runs on the store's thread, outside this task's context
        traceparent = telemetry.inject_headers().get("traceparent", "")

        def run(tr: Transaction) -> T:
            mtx = MailTx(tr, user, traceparent=traceparent)
            holder["mtx"] = mtx
            return fn(mtx)

        result = await self.db.run(run)
        mtx = holder["mtx"]
        if mtx.changes:
            self.hub.notify(user)
        return result

    async def collect_blobs(self, grace_s: float, limit: int = 200) -> int:
        """Removes blob files no message has referenced for `grace_s` seconds; returns how many.
        Deleting a message only marks its blob; the delay keeps a blob that ingest has just
        stored (or a delivery has just touched) safe from a concurrent delete of a
        byte-identical message."""
        removed = 0
        while True:
            scanned, n = await self._collect_batch(grace_s, limit)
            removed += n
            if scanned < limit:
                return removed

    async def _collect_batch(self, grace_s: float, limit: int) -> tuple[int, int]:
        """One batch of the oldest marks, up to the first still in its grace period."""
        cutoff = time.time_ns() // 1000 - int(grace_s * 1_000_000)
        begin, _ = keys.g_range("blobgc")
        end = keys.g("blobgc", cutoff + 1)
        rows = await self.db.run(lambda tr: tr.get_range(begin, end, limit=limit), readonly=True)
        removed = 0
        for k, _ in rows:
            ref = str(keys.unpack(k)[-1])
            referenced = await self.db.run(functools.partial(_has_key, key=keys.g("blob", ref)), readonly=True)
            if not referenced and await self.blobs.collect(ref, grace_s):
                removed += 1

            def forget(tr: Transaction, r: str = ref, key: bytes = k) -> None:
                if tr.get(keys.g("blob", r)) is None and tr.get(key) is not None:
                    tr.clear(key)
                    tr.clear(keys.g("blobgcref", r))

            await self.db.run(forget)
        return len(rows), removed

    async def run_blob_gc(self, stop: asyncio.Event, grace_s: float, every_s: float = 60.0) -> None:
        while not stop.is_set():
            try:
                await self.collect_blobs(grace_s)
            except MailmeshError as exc:
                log.warning("blob collection: %s", exc.message)
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except TimeoutError:
                pass

    async def read(self, user: str, fn: Callable[[MailTx], T]) -> T:
        return await self.db.run(lambda tr: fn(MailTx(tr, user)), readonly=True)

    async def require_user(self, user: str) -> None:
        def live(tr: Transaction) -> bool:
            return tr.get(keys.u(user, "acct")) is not None and tr.get(keys.u(user, "deleting")) is None

        if not await self.db.run(live, readonly=True):
            raise NotFound("no such user")

    # --- parsing ------------------------------------------------------------------------------
    async def parsed(self, blob_ref: str, raw: bytes | None = None) -> tuple[mime.ParsedMessage, int]:
        cached = self._parsed.get(blob_ref)
        if cached is not None:
            self._parsed.move_to_end(blob_ref)
            return cached, cached.size
        if raw is None:
            raw = await self.blobs.get(blob_ref)
        parsed = await asyncio.to_thread(mime.parse_message, raw)
        parsed.size = len(raw)
        self._parsed[blob_ref] = parsed
        self._parsed_bytes += parsed.size
        # bounded by entries and by the raw bytes they came from (bodies are at most that big)
        while len(self._parsed) > PARSED_CACHE_ENTRIES or (
                self._parsed_bytes > PARSED_CACHE_BYTES and len(self._parsed) > 1):
            _, evicted = self._parsed.popitem(last=False)
            self._parsed_bytes -= evicted.size
        return parsed, len(raw)

    async def new_message(self, blob_ref: str, raw: bytes | None, *, label_ids: list[str], unread: bool,
                          starred: bool = False, keywords: list[str] | None = None, internal_us: int = 0,
                          spam_score: float = 0.0, recipients: list[str] | None = None) -> messages.NewMessage:
        parsed, size = await self.parsed(blob_ref, raw)
        return messages.NewMessage(
            blob_ref=blob_ref, size=size, parsed=parsed, chain=mime.reference_chain(parsed),
            participants=mime.participants(parsed), norm_subject=mime.normalize_subject(parsed.subject),
            internal_us=internal_us or now_us(), label_ids=label_ids, unread=unread, starred=starred,
            keywords=list(keywords or ()), spam_score=spam_score, recipients=list(recipients or ()))

    # --- domains and accounts -------------------------------------------------------------------
    async def create_domain(self, name: str) -> types_pb2.Domain:
        return await self.db.run(lambda tr: accounts.create_domain(tr, name))

    async def list_domains(self, size: int, token: str) -> tuple[list[types_pb2.Domain], str]:
        n = page_size(size, 100, 1000)
        cur = self.tokens.decode(token, "-", "domains")
        after = cur.id if cur else ""
        items = await self.db.run(lambda tr: accounts.list_domains(tr, after, n + 1), readonly=True)
        nxt = self.tokens.encode("-", "domains", Cursor(0, items[n - 1].name)) if len(items) > n else ""
        return items[:n], nxt

    async def create_account(self, req: pb.CreateAccountRequest) -> types_pb2.Account:
        pw_hash = await asyncio.to_thread(accounts.hash_password, req.password)
        user_id = secrets.token_hex(8)
        return await self.db.run(lambda tr: accounts.create_account(
            tr, req, user_id, pw_hash, self.settings.default_quota_bytes))

    async def list_accounts(self, domain: str, size: int, token: str) -> tuple[list[types_pb2.Account], str]:
        n = page_size(size, 100, 1000)
        scope = f"accounts:{domain}"
        cur = self.tokens.decode(token, "-", scope)
        after = cur.id if cur else ""
        items = await self.db.run(lambda tr: accounts.list_accounts(tr, domain, after, n + 1), readonly=True)
        nxt = self.tokens.encode("-", scope, Cursor(0, items[n - 1].email)) if len(items) > n else ""
        return items[:n], nxt

    async def get_account(self, user: str) -> types_pb2.Account:
        return await self.db.run(lambda tr: accounts.load_account(tr, user), readonly=True)

    async def user_for_email(self, email: str) -> str:
        user = await self.db.run(lambda tr: accounts.user_for_address(tr, email), readonly=True)
        if user is None:
            raise NotFound("no account has that address")
        return user

    async def set_password(self, user: str, password: str) -> None:
        await self.require_user(user)
        pw_hash = await asyncio.to_thread(accounts.hash_password, password)
        await self.db.run(lambda tr: tr.set(keys.u(user, "pw"), pw_hash.encode()))

    async def authenticate(self, email: str, password: str) -> types_pb2.Account:
        def lookup(tr: Transaction) -> tuple[str | None, str | None]:
            user = accounts.user_for_address(tr, email) if email else None
            raw = tr.get(keys.u(user, "pw")) if user else None
            return user, raw.decode() if raw else None

        user, stored = await self.db.run(lookup, readonly=True)
        ok = await asyncio.to_thread(accounts.verify_password, password, stored)
        if not ok or user is None:
            raise Unauthenticated("invalid address or password")
        return await self.get_account(user)

    async def resolve_recipient(self, addr: str, size: int) -> pb.ResolveRecipientResponse:
        if not addr or len(addr) > 512:
            raise InvalidInput("address must be 1..512 characters")
        return await self.db.run(lambda tr: accounts.resolve_recipient(tr, addr, size, self.settings.postmaster),
                                 readonly=True)

    # --- adding mail ---------------------------------------------------------------------------
    async def deliver(self, user: str, ingest_id: str, blob_ref: str, target: int, spam_score: float,
                      received_us: int, *, enforce_quota: bool = True) -> tuple[types_pb2.Message, bool]:
        if not ingest_id or len(ingest_id) > 200:
            raise InvalidInput("ingest_id must be 1..200 characters")
        await self.require_user(user)
        label = "SPAM" if target == pb.DELIVERY_TARGET_SPAM else "INBOX"
        blobstore.validate_ref(blob_ref)
        # touched: blob collection leaves it alone until well after this reference commits
        if not await self.blobs.touch(blob_ref):
            raise NotFound(f"blob {blob_ref} not found")
        new = await self.new_message(blob_ref, None, label_ids=[label], unread=True, internal_us=received_us,
                                     spam_score=spam_score)
        return await self.write(user, lambda m: messages.deliver(m, ingest_id, new, enforce_quota=enforce_quota))

    async def resolve_recipients(self, addrs: Iterable[str]) -> dict[str, pb.ResolveRecipientResponse | str]:
        """resolve_recipient for many addresses in one read transaction; an address that is not
        valid maps to the reason instead of a resolution."""
        wanted = list(dict.fromkeys(addrs))

        def fn(tr: Transaction) -> dict[str, pb.ResolveRecipientResponse | str]:
            out: dict[str, pb.ResolveRecipientResponse | str] = {}
            for a in wanted:
                if not a or len(a) > 512:
                    out[a] = "address must be 1..512 characters"
                    continue
                try:
                    out[a] = accounts.resolve_recipient(tr, a, 0, self.settings.postmaster)
                except InvalidInput as exc:
                    out[a] = exc.message
            return out

        return await self.db.run(fn, readonly=True)

    async def deliver_batch(self, items: Sequence[BatchDelivery]) -> list[tuple[types_pb2.Message, bool] | None]:
        """Delivers many messages, to one user or many, in ONE transaction (the INBOUND
        consumer's path; no quota check, like `deliver(enforce_quota=False)`). Each result is
        (message, duplicate) as `deliver` returns it, or None when the account is gone or being
        deleted. The caller bounds the batch to the KV limits (size and time) and has touched
        the blobs. Any error fails the whole batch: nothing of it is committed."""
        for it in items:
            if not it.ingest_id or len(it.ingest_id) > 200:
                raise InvalidInput("ingest_id must be 1..200 characters")

        def fn(tr: Transaction) -> tuple[list[tuple[types_pb2.Message, bool] | None], list[str]]:
            mtxs: dict[str, MailTx] = {}
            gone: set[str] = set()
            out: list[tuple[types_pb2.Message, bool] | None] = []
            for it in items:
                mtx = mtxs.get(it.user)
                if mtx is None and it.user not in gone:
                    if tr.get(keys.u(it.user, "acct")) is None or tr.get(keys.u(it.user, "deleting")) is not None:
                        gone.add(it.user)
                    else:
                        mtx = mtxs[it.user] = MailTx(tr, it.user, traceparent=it.traceparent)
                if mtx is None:
                    out.append(None)
                    continue
                mtx.traceparent = it.traceparent  # each change carries its own message's trace
                out.append(messages.deliver(mtx, it.ingest_id, it.new, enforce_quota=False))
            return out, [u for u, m in mtxs.items() if m.changes]

        results, changed = await self.db.run(fn)
        for user in changed:
            self.hub.notify(user)
        return results

    async def append(self, user: str, req: pb.AppendMessageRequest) -> types_pb2.Message:
        if not req.raw:
            raise InvalidInput("raw must not be empty")
        if len(req.raw) > self.settings.max_message_bytes:
            raise LimitExceeded(f"message is larger than {self.settings.max_message_bytes} bytes")
        if len(req.idempotency_key) > 200:
            raise InvalidInput("idempotency_key is longer than 200 characters")
        keywords = messages.merge_keywords([messages.check_keyword(k) for k in req.keywords])
        if len(req.track_recipients) > messages.MAX_ADDRESSES:
            raise InvalidInput(f"at most {messages.MAX_ADDRESSES} track_recipients")
        for rcpt in req.track_recipients:
            if not address.is_valid_mailbox(rcpt):
                raise InvalidInput(f"track_recipients: {rcpt[:100]!r} is not an address")
        await self.require_user(user)
        label_ids = await self.read(user, lambda m: labels.resolve_ids(m, list(req.label_ids), field="label_ids"))
        internal = messages.timestamp_us(req.internal_date, "internal_date") if req.HasField("internal_date") else 0
        blob_ref = await self.blobs.put(req.raw)  # put touches an existing blob (see collect_blobs)
        new = await self.new_message(blob_ref, req.raw, label_ids=label_ids, unread=req.unread,
                                     starred=req.starred, keywords=keywords, internal_us=internal,
                                     recipients=list(req.track_recipients))
        return await self.write(user, lambda m: messages.append(m, new, req.idempotency_key))

    # --- labels ---------------------------------------------------------------------------------
    async def list_labels(self, user: str) -> list[types_pb2.Label]:
        await self.require_user(user)
        return await self.read(user, labels.list_all)

    async def get_label(self, user: str, label_id: str) -> types_pb2.Label:
        return await self.read(user, lambda m: labels.load(m, _label_id(label_id)))

    async def create_label(self, user: str, name: str) -> types_pb2.Label:
        await self.require_user(user)
        return await self.write(user, lambda m: labels.create(m, name))

    async def rename_label(self, user: str, label_id: str, name: str) -> types_pb2.Label:
        return await self.write(user, lambda m: labels.rename(m, _label_id(label_id), name))

    async def delete_label(self, user: str, label_id: str) -> None:
        job = await self.write(user, lambda m: jobs.start_delete_label(m, _label_id(label_id)))
        await self.run_job(user, job)

    async def empty_label(self, user: str, label_id: str) -> int:
        job = await self.write(user, lambda m: jobs.start_empty(m, _label_id(label_id)))
        return await self.run_job(user, job)

    async def run_job(self, user: str, job_id: str) -> int:
        total = 0
        while True:
            finished, n = await self.write(user, lambda m: jobs.step(m, job_id))
            total += n
            if finished:
                return total

    async def delete_account(self, user: str) -> int:
        """Deletes the account now (it stops resolving at once) and its mail in bounded steps."""
        job = await self.write(user, jobs.start_delete_account)
        return await self.run_job(user, job)

    async def recount(self, user: str) -> tuple[list[types_pb2.Label], types_pb2.Account]:
        """Rebuilds every counter of the mailbox from its indexes (a repair tool: run it while
        the mailbox is quiet, as writes during the scan may be counted or missed)."""
        job = await self.write(user, jobs.start_recount)
        await self.run_job(user, job)
        return await self.list_labels(user), await self.get_account(user)

    async def export(self, user: str, label_id: str, token: str) -> AsyncIterator[pb.ExportMessagesResponse]:
        """Every message (or every message of a label) in id order, resumable by page token;
        each read is a small transaction."""
        await self.require_user(user)
        scope = f"export:{label_id}"
        cursor = self.tokens.decode(token, user, scope)
        after = cursor.id if cursor else ""
        label = _label_id(label_id) if label_id else ""
        if label:
            await self.get_label(user, label)

        def page(tr: Transaction, start: str) -> list[types_pb2.Message]:
            b, e = keys.u_range(user, "msg")
            if start:
                b = keys.u(user, "msg", start) + b"\x00"
            return [types_pb2.Message.FromString(v) for _, v in tr.get_range(b, e, limit=100)]

        while True:
            batch = await self.db.run(functools.partial(page, start=after), readonly=True)
            for m in batch:
                after = m.id
                if label and label not in m.label_ids and not (label == keys.ALL and
                                                               not {"SPAM", "TRASH"} & set(m.label_ids)):
                    continue
                try:
                    raw = await self.blobs.get(m.blob_ref)
                except NotFound:
                    log.error("export: blob of message %s of user %s is missing", m.id, user)
                    continue
                yield pb.ExportMessagesResponse(message=m, raw=raw,
                                                next_page_token=self.tokens.encode(user, scope, Cursor(0, m.id)))
            if len(batch) < 100:
                return

    async def resume_jobs(self) -> None:
        for user, job_id in await self.db.run(jobs.pending, readonly=True):
            log.info("resuming job %s of user %s", job_id, user)
            await self.run_job(user, job_id)

    # --- reading --------------------------------------------------------------------------------
    async def list_messages(self, user: str, req: pb.ListMessagesRequest) -> pb.ListMessagesResponse:
        n = page_size(req.page_size)
        fmt = check_format(req.format)
        if fmt not in (types_pb2.MESSAGE_FORMAT_MINIMAL, types_pb2.MESSAGE_FORMAT_METADATA):
            raise InvalidInput("format: ListMessages supports the MINIMAL and METADATA formats")
        label = messages.canonical_label(req.label_id)
        scope = f"m:{label}:{int(req.unread_only)}:{int(req.starred_only)}"
        cursor = self.tokens.decode(req.page_token, user, scope)
        await self.require_user(user)
        items, nxt, total, _ = await self.read(
            user, lambda m: messages.list_messages(m, label, req.unread_only, req.starred_only, n, cursor))
        return pb.ListMessagesResponse(messages=[render(x, fmt) for x in items],
                                       next_page_token=self.tokens.encode(user, scope, nxt),
                                       result_size_estimate=total)

    async def list_threads(self, user: str, req: pb.ListThreadsRequest) -> pb.ListThreadsResponse:
        n = page_size(req.page_size)
        label = messages.canonical_label(req.label_id)
        scope = f"t:{label}:{int(req.unread_only)}:{int(req.starred_only)}"
        cursor = self.tokens.decode(req.page_token, user, scope)
        await self.require_user(user)
        items, nxt, total, _ = await self.read(
            user, lambda m: messages.list_threads(m, label, req.unread_only, req.starred_only, n, cursor))
        return pb.ListThreadsResponse(threads=items, next_page_token=self.tokens.encode(user, scope, nxt),
                                      result_size_estimate=total)

    async def get_message(self, user: str, msg_id: str, fmt: int) -> types_pb2.Message:
        fmt = check_format(fmt)
        m = await self.read(user, lambda t: messages.load(t, msg_id))
        if fmt == types_pb2.MESSAGE_FORMAT_FULL:
            parsed, _ = await self.parsed(m.blob_ref)
            m.text_body = parsed.text_body
            m.html_body = parsed.html_body
            for a in parsed.attachments:
                m.attachments.add(attachment_id=a.part_id, filename=a.filename, mime_type=a.content_type,
                                  size=a.size, content_id=a.content_id, inline=a.inline)
            return m
        out = render(m, fmt)
        if fmt == types_pb2.MESSAGE_FORMAT_RAW:
            out.raw = await self.blobs.get(m.blob_ref)
        return out

    async def attachment(self, user: str, msg_id: str, attachment_id: str) -> AsyncIterator[pb.GetAttachmentResponse]:
        if not attachment_id or len(attachment_id) > 64:
            raise InvalidInput("attachment_id must be 1..64 characters")
        m = await self.read(user, lambda t: messages.load(t, msg_id))
        raw = await self.blobs.get(m.blob_ref)
        info, data = await asyncio.to_thread(mime.get_attachment, raw, attachment_id)
        desc = types_pb2.Attachment(attachment_id=info.part_id, filename=info.filename, mime_type=info.content_type,
                                    size=len(data), content_id=info.content_id, inline=info.inline)
        yield pb.GetAttachmentResponse(attachment=desc, data=data[:ATTACHMENT_CHUNK])
        for off in range(ATTACHMENT_CHUNK, len(data), ATTACHMENT_CHUNK):
            yield pb.GetAttachmentResponse(data=data[off:off + ATTACHMENT_CHUNK])

    async def get_thread(self, user: str, thread_id: str, fmt: int) -> types_pb2.Thread:
        fmt = check_format(fmt)
        thread, members = await self.read(user, lambda m: messages.get_thread(m, thread_id))
        if fmt == types_pb2.MESSAGE_FORMAT_FULL:
            thread.messages.extend([await self.get_message(user, m.id, fmt) for m in members])
        else:
            thread.messages.extend(render(m, fmt) for m in members)
        return thread

    # --- changing -------------------------------------------------------------------------------
    async def batch_modify(self, user: str, req: pb.BatchModifyMessagesRequest) -> pb.BatchModifyMessagesResponse:
        unread = req.unread if req.HasField("unread") else None
        starred = req.starred if req.HasField("starred") else None
        out, skipped = await self.write(user, lambda m: messages.modify(
            m, list(req.ids), list(req.add_label_ids), list(req.remove_label_ids), unread, starred,
            list(req.add_keywords), list(req.remove_keywords), req.unchanged_since))
        return pb.BatchModifyMessagesResponse(messages=[render(x, types_pb2.MESSAGE_FORMAT_MINIMAL) for x in out],
                                              modified_ids=skipped)

    async def trash(self, user: str, msg_id: str) -> types_pb2.Message:
        return await self.write(user, lambda m: messages.trash(m, msg_id))

    async def untrash(self, user: str, msg_id: str) -> types_pb2.Message:
        return await self.write(user, lambda m: messages.untrash(m, msg_id))

    async def delete(self, user: str, msg_id: str) -> None:
        await self.write(user, lambda m: messages.delete(m, msg_id))

    async def update_delivery_status(self, user: str, msg_id: str,
                                     updates: list[types_pb2.RecipientStatus]) -> types_pb2.Message:
        def fn(mtx: MailTx) -> types_pb2.Message:
            old = messages.load(mtx, msg_id)
            msg = types_pb2.Message()
            msg.CopyFrom(old)
            by_email = {r.email.lower(): r for r in msg.recipients}
            for up in updates:
                cur = by_email.get(up.email.lower())
                if cur is None:
                    raise NotFound(f"{up.email} is not a tracked recipient of this message")
                cur.CopyFrom(up)
            if msg == old:
                return old
            # through the index: the labels' HIGHESTMODSEQ must cover the message's new modseq
            index.apply(mtx, old, msg, types_pb2.CHANGE_TYPE_DELIVERY_UPDATED)
            return msg

        return await self.write(user, fn)

    # --- changes --------------------------------------------------------------------------------
    async def list_changes(self, user: str, since: int, size: int) -> pb.ListChangesResponse:
        n = page_size(size, 100, 1000)
        await self.require_user(user)
        changes, highest, more = await self.db.run(functools.partial(changelog.list_changes, user=user, since=since, limit=n),
                                                   readonly=True)
        return pb.ListChangesResponse(changes=changes, highest_modseq=highest, has_more=more)

    async def watch(self, user: str, since: int, stop: asyncio.Event | None = None,
                    poll_s: float = 1.0) -> AsyncIterator[types_pb2.Change]:
        await self.require_user(user)
        ev = self.hub.subscribe(user)
        try:
            while stop is None or not stop.is_set():
                ev.clear()
                changes, _, more = await self.db.run(
                    functools.partial(changelog.list_changes, user=user, since=since, limit=500), readonly=True)
                for ch in changes:
                    since = ch.modseq
                    yield ch
                if not more:
                    try:
                        await asyncio.wait_for(ev.wait(), poll_s)
                    except TimeoutError:
                        pass
        finally:
            self.hub.unsubscribe(user, ev)

    async def list_label_uids(self, user: str, req: pb.ListLabelUidsRequest, label_id: str) -> pb.ListLabelUidsResponse:
        """Entries of a label's UID range in UID order. With changed_since, unchanged messages are
        left out; one call examines at most MAX_UID_SCAN UIDs, and when it stops there it still
        returns the last UID it examined (its modseq shows it is unchanged), so `has_more` always
        comes with an entry to continue after."""
        n = page_size(req.page_size, 1000, 10_000)
        lo = max(req.uid_min, 1)
        hi = req.uid_max or 0xFFFFFFFF
        if hi < lo:
            raise InvalidInput("uid_max is smaller than uid_min")

        def fn(mtx: MailTx) -> pb.ListLabelUidsResponse:
            label = labels.load(mtx, _label_id(label_id))
            out = pb.ListLabelUidsResponse(label=label)

            def add(uid: int, m: types_pb2.Message) -> None:
                e = out.entries.add(uid=uid, message_id=m.id, modseq=m.history_id, unread=m.unread,
                                    starred=m.starred, keywords=m.keywords, size=m.size_estimate)
                e.internal_date.CopyFrom(m.internal_date)

            end = keys.u(user, "uid", label.id, hi + 1)
            pos, scanned = lo, 0
            skipped: tuple[int, types_pb2.Message] | None = None  # the last examined, not returned
            while True:
                limit = n - len(out.entries) + 1  # one more than needed: tells whether more follow
                rows = mtx.tr.get_range(keys.u(user, "uid", label.id, pos), end, limit=limit)
                for k, v in rows:
                    if len(out.entries) == n:
                        out.has_more = True
                        return out
                    uid = int(keys.unpack(k)[-1])
                    pos, scanned = uid + 1, scanned + 1
                    raw = mtx.tr.get(keys.u(user, "msg", v.decode()))
                    if raw is None:
                        continue
                    m = types_pb2.Message.FromString(raw)
                    if req.changed_since and m.history_id <= req.changed_since:
                        skipped = (uid, m)
                        continue
                    skipped = None
                    add(uid, m)
                if len(rows) < limit:
                    return out
                if scanned >= MAX_UID_SCAN:
                    out.has_more = True
                    if skipped is not None:
                        add(*skipped)
                    return out

        await self.require_user(user)
        return await self.read(user, fn)


def _label_id(label_id: str) -> str:
    up = label_id.upper()
    if up in labels.SYSTEM_LABELS or up == keys.ALL:
        return up
    return label_id


def _has_key(tr: Transaction, *, key: bytes) -> bool:
    return tr.get(key) is not None
