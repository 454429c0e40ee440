"""Messages in a mailbox: adding (delivery, append), reading, listing, modifying labels and
flags, trash and delete forever. All functions run inside one KV transaction (`MailTx`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import types_pb2

from mailmesh_common.errors import InvalidInput, LimitExceeded, NotFound, QuotaExceeded
from mailmesh_common.kv import decode_counter, encode_counter
from mailmesh_common.mime import ParsedMessage
from svc_mailbox import index, keys, labels, threads
from svc_mailbox.pagetoken import Cursor
from svc_mailbox.txn import MailTx, ts_from_us

MAX_BATCH = 1000
MAX_PAGE = 500
MAX_ADDRESSES = 200
MAX_REFERENCES = 100
MAX_RECORD_BYTES = 64_000
# IMAP system flags kept as keywords (canonical spelling); \Seen and \Flagged are the unread
# and starred states, \Recent is the server's own
SYSTEM_FLAGS = {"\\answered": "\\Answered", "\\deleted": "\\Deleted", "\\draft": "\\Draft"}
STATE_FLAGS = {"\\seen": "unread", "\\flagged": "starred"}
ATOM_SPECIALS = frozenset('(){ %*"\\]')
MAX_KEYWORDS = 64
MAX_KEYWORD_LENGTH = 100
# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z
MIN_SECONDS, MAX_SECONDS = -62_135_596_800, 253_402_300_799
MAX_SCAN = 2000  # index entries a filtering list walk examines per page
LIST_THREAD_MESSAGES = 20  # message summaries per thread in ListThreads (GetThread has them all)

T = TypeVar("T")


@dataclass
class NewMessage:
    """Everything known about a message before it is added (parsed outside the transaction)."""

    blob_ref: str
    size: int
    parsed: ParsedMessage
    chain: list[str]
    participants: set[str]
    norm_subject: str
    internal_us: int
    label_ids: list[str]
    unread: bool = True
    starred: bool = False
    keywords: list[str] = field(default_factory=list)
    spam_score: float = 0.0
    recipients: list[str] = field(default_factory=list)


def _addresses(out: object, addrs: Sequence[object]) -> None:
    for a in list(addrs)[:MAX_ADDRESSES]:
        out.add(name=a.name[:500], email=a.email[:320])  # type: ignore[attr-defined]


def build_record(msg_id: str, new: NewMessage) -> types_pb2.Message:
    p = new.parsed
    m = types_pb2.Message(
        id=msg_id, unread=new.unread, starred=new.starred, snippet=p.snippet[:200],
        size_estimate=new.size, subject=p.subject[:2000], message_id_header=p.message_id[:900],
        has_attachments=p.has_attachments, blob_ref=new.blob_ref, spam_score=new.spam_score,
        parse_warnings=[w[:300] for w in p.parse_warnings[:20]],
    )
    m.internal_date.CopyFrom(ts_from_us(new.internal_us))
    if p.date is not None:
        m.date.FromDatetime(p.date)
    for name in ("from_", "to", "cc", "bcc", "reply_to"):
        _addresses(getattr(m, name.rstrip("_")), getattr(p, name))
    m.in_reply_to.extend(i[:900] for i in p.in_reply_to[:MAX_REFERENCES])
    m.references.extend(i[:900] for i in p.references[-MAX_REFERENCES:])
    labs = list(dict.fromkeys(new.label_ids))
    if new.starred and "STARRED" not in labs:
        labs.append("STARRED")
    m.starred = "STARRED" in labs
    m.label_ids.extend(labs)
    m.keywords.extend(merge_keywords(new.keywords))
    for rcpt in new.recipients[:MAX_ADDRESSES]:
        m.recipients.add(email=rcpt, state=types_pb2.RECIPIENT_STATE_QUEUED,
                         updated_time=ts_from_us(new.internal_us))
    _fit(m)
    return m


def _fit(m: types_pb2.Message) -> None:
    """Keeps the record well under FoundationDB's 100 kB value limit: long address and
    reference lists are cut (the raw message in the blob stays complete)."""
    if m.ByteSize() <= MAX_RECORD_BYTES:
        return
    for name in ("references", "bcc", "cc", "to", "reply_to", "in_reply_to", "from"):
        lst = getattr(m, name)
        while len(lst) > 1 and m.ByteSize() > MAX_RECORD_BYTES:
            del lst[max(1, len(lst) // 2):]
    if m.ByteSize() > MAX_RECORD_BYTES:
        m.subject = m.subject[:200]
        for name in ("from", "to", "cc", "bcc", "reply_to"):
            for a in getattr(m, name):
                a.name = a.name[:100]
    m.parse_warnings.append("address or reference lists were too long and are cut in the summary; "
                            "the raw message is complete")


def check_quota(mtx: MailTx, size: int) -> None:
    raw = mtx.tr.get(keys.u(mtx.user, "acct"))
    if raw is None:
        raise NotFound("no such user")
    quota = types_pb2.Account.FromString(raw).quota_bytes
    used = mtx.counter("ctr", "used")
    if quota and used + size > quota:
        raise QuotaExceeded(f"mailbox quota exceeded: {used + size} of {quota} bytes")


def add(mtx: MailTx, new: NewMessage, *, msg_id: str | None = None) -> types_pb2.Message:
    """Adds a message: record, thread, indexes, counters, changelog, blob reference."""
    for lid in new.label_ids:
        if not labels.exists(mtx, lid):
            raise NotFound(f"label {lid!r} not found")
    msg = build_record(msg_id or threads.new_id(), new)
    msg.thread_id = threads.assign(mtx, msg, new.chain, new.participants, new.norm_subject)
    index.apply(mtx, None, msg, types_pb2.CHANGE_TYPE_MESSAGE_ADDED)
    mtx.tr.add(keys.g("blob", new.blob_ref), 1)
    unmark_blob(mtx, new.blob_ref)
    return msg


def deliver(mtx: MailTx, ingest_id: str, new: NewMessage, *, enforce_quota: bool) -> tuple[types_pb2.Message, bool]:
    """Idempotent on ingest_id: a repeated delivery returns the first message, duplicate=True."""
    dedup = keys.u(mtx.user, "dlv", ingest_id)
    prior = mtx.tr.get(dedup)
    if prior is not None:
        raw = mtx.tr.get(keys.u(mtx.user, "msg", prior.decode()))
        if raw is not None:
            return types_pb2.Message.FromString(raw), True
        return types_pb2.Message(id=prior.decode()), True  # delivered, since deleted by the user
    if enforce_quota:
        check_quota(mtx, new.size)
    msg = add(mtx, new)
    mtx.tr.set(dedup, msg.id.encode())
    return msg, False


def append(mtx: MailTx, new: NewMessage, idempotency_key: str) -> types_pb2.Message:
    if idempotency_key:
        if len(idempotency_key) > 200:
            raise InvalidInput("idempotency_key is longer than 200 characters")
        prior = mtx.tr.get(keys.u(mtx.user, "idem", idempotency_key))
        if prior is not None:
            raw = mtx.tr.get(keys.u(mtx.user, "msg", prior.decode()))
            if raw is not None:
                return types_pb2.Message.FromString(raw)
    check_quota(mtx, new.size)
    msg = add(mtx, new)
    if idempotency_key:
        mtx.tr.set(keys.u(mtx.user, "idem", idempotency_key), msg.id.encode())
    return msg


def load(mtx: MailTx, msg_id: str) -> types_pb2.Message:
    if not msg_id or len(msg_id) > 64:
        raise InvalidInput("message id is empty or too long")
    raw = mtx.tr.get(keys.u(mtx.user, "msg", msg_id))
    if raw is None:
        raise NotFound(f"message {msg_id!r} not found")
    return types_pb2.Message.FromString(raw)


def _copy(m: types_pb2.Message) -> types_pb2.Message:
    c = types_pb2.Message()
    c.CopyFrom(m)
    return c


def _set_labels(m: types_pb2.Message, new_labels: list[str]) -> None:
    del m.label_ids[:]
    m.label_ids.extend(new_labels)
    m.starred = "STARRED" in new_labels


def check_keyword(kw: str) -> str:
    """An IMAP keyword (an atom, matched case-insensitively) or one of the system flags
    \\Answered, \\Deleted, \\Draft (returned in their canonical spelling)."""
    if kw.startswith("\\"):
        low = kw.lower()
        if low in STATE_FLAGS:
            raise InvalidInput(f"{kw!r} is set through {STATE_FLAGS[low]}, not as a keyword")
        if low in SYSTEM_FLAGS:
            return SYSTEM_FLAGS[low]
        raise InvalidInput(f"invalid keyword {kw[:MAX_KEYWORD_LENGTH]!r}: "
                           "the system flags kept as keywords are \\Answered, \\Deleted and \\Draft")
    if not kw or len(kw) > MAX_KEYWORD_LENGTH or any(c in ATOM_SPECIALS or not "!" <= c <= "~" for c in kw):
        raise InvalidInput(f"invalid keyword {kw[:MAX_KEYWORD_LENGTH]!r}: 1..{MAX_KEYWORD_LENGTH} printable "
                           "ASCII characters without spaces or ( ) { % * \" \\ ]")
    return kw


def merge_keywords(current: Sequence[str], add: Sequence[str] = (), remove: Sequence[str] = ()) -> list[str]:
    """Keywords after adding and removing some (case-insensitively; removal wins), sorted."""
    out: dict[str, str] = {}
    for k in (*current, *add):
        out.setdefault(k.casefold(), k)
    for k in remove:
        out.pop(k.casefold(), None)
    if len(out) > MAX_KEYWORDS:
        raise LimitExceeded(f"at most {MAX_KEYWORDS} keywords per message")
    return sorted(out.values())


def timestamp_us(ts: Timestamp, field: str) -> int:
    """Microseconds of a client's timestamp; InvalidInput outside google.protobuf.Timestamp's range."""
    if not MIN_SECONDS <= ts.seconds <= MAX_SECONDS or not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidInput(f"{field} is not a valid timestamp (years 1..9999, nanos 0..999999999)")
    return int(ts.seconds * 1_000_000 + ts.nanos // 1000)


def modify(mtx: MailTx, ids: Sequence[str], add_labels: Sequence[str], remove_labels: Sequence[str],
           unread: bool | None, starred: bool | None, add_kw: Sequence[str], remove_kw: Sequence[str],
           unchanged_since: int = 0) -> tuple[list[types_pb2.Message], list[str]]:
    if not ids:
        raise InvalidInput("ids must not be empty")
    if len(ids) > MAX_BATCH:
        raise LimitExceeded(f"at most {MAX_BATCH} messages per batch")
    add_l, rem_l = list(add_labels), list(remove_labels)
    # Gmail's pseudo-labels UNREAD and STARRED map onto the flags
    for lst, value in ((add_l, True), (rem_l, False)):
        for lid in list(lst):
            if lid.upper() == "UNREAD":
                lst.remove(lid)
                if unread is not None and unread != value:
                    raise InvalidInput("UNREAD is both added and removed")
                unread = value
    add_ids = labels.resolve_ids(mtx, add_l, field="add_label_ids")
    rem_ids = labels.resolve_ids(mtx, rem_l, field="remove_label_ids")
    if set(add_ids) & set(rem_ids):
        raise InvalidInput("a label cannot be both added and removed")
    if starred is True:
        add_ids.append("STARRED") if "STARRED" not in add_ids else None
    if starred is False:
        rem_ids.append("STARRED") if "STARRED" not in rem_ids else None
    if "STARRED" in add_ids and "STARRED" in rem_ids:
        raise InvalidInput("starred is both set and cleared")
    kw_add = [check_keyword(k) for k in add_kw]
    kw_rem = [check_keyword(k) for k in remove_kw]
    out: list[types_pb2.Message] = []
    skipped: list[str] = []
    pending: dict[str, set[str]] = {}
    for msg_id in dict.fromkeys(ids):
        old = load(mtx, msg_id)
        if unchanged_since and old.history_id > unchanged_since:
            skipped.append(msg_id)
            out.append(old)
            continue
        new = _copy(old)
        cur = list(new.label_ids)
        next_labels = [lb for lb in cur if lb not in rem_ids] + [lb for lb in add_ids if lb not in cur]
        if "TRASH" in add_ids and "TRASH" not in cur:
            _to_trash(new, next_labels)
        else:
            _set_labels(new, next_labels)
            if "TRASH" not in next_labels:
                del new.trashed_from_label_ids[:]  # only meaningful while in TRASH
        if unread is not None:
            new.unread = unread
        kws = merge_keywords(new.keywords, kw_add, kw_rem)
        del new.keywords[:]
        new.keywords.extend(kws)
        if new == old:
            out.append(old)
            continue
        kind = (types_pb2.CHANGE_TYPE_LABELS_CHANGED if list(new.label_ids) != list(old.label_ids)
                else types_pb2.CHANGE_TYPE_FLAGS_CHANGED)
        index.apply(mtx, old, new, kind, pending)
        out.append(new)
    index.refresh_threads(mtx, pending)
    return out, skipped


def _to_trash(m: types_pb2.Message, requested: list[str]) -> None:
    """Trash keeps only TRASH (and STARRED); the other labels are remembered for untrash."""
    del m.trashed_from_label_ids[:]
    m.trashed_from_label_ids.extend(lb for lb in m.label_ids if lb not in ("TRASH", "STARRED"))
    _set_labels(m, ["TRASH"] + (["STARRED"] if "STARRED" in requested else []))


def trash(mtx: MailTx, msg_id: str) -> types_pb2.Message:
    old = load(mtx, msg_id)
    if "TRASH" in old.label_ids:
        return old
    new = _copy(old)
    _to_trash(new, list(old.label_ids))
    index.apply(mtx, old, new, types_pb2.CHANGE_TYPE_LABELS_CHANGED)
    return new


def untrash(mtx: MailTx, msg_id: str) -> types_pb2.Message:
    old = load(mtx, msg_id)
    if "TRASH" not in old.label_ids:
        return old
    new = _copy(old)
    # back where it was; a message trashed from All Mail only (archived) goes back there, and
    # labels deleted meanwhile are not restored
    restored = [lb for lb in old.trashed_from_label_ids if labels.exists(mtx, lb)]
    keep = [lb for lb in old.label_ids if lb != "TRASH"]
    _set_labels(new, keep + [lb for lb in restored if lb not in keep])
    del new.trashed_from_label_ids[:]
    index.apply(mtx, old, new, types_pb2.CHANGE_TYPE_LABELS_CHANGED)
    return new


def delete(mtx: MailTx, msg_id: str, pending_threads: dict[str, set[str]] | None = None) -> types_pb2.Message:
    """Deletes forever; drops the blob when no other message references it (after commit)."""
    old = load(mtx, msg_id)
    index.apply(mtx, old, None, types_pb2.CHANGE_TYPE_MESSAGE_DELETED, pending_threads)
    release_blob(mtx, old.blob_ref)
    return old


def _index_for(unread_only: bool, starred_only: bool, threads_: bool) -> str:
    prefix = "t" if threads_ else "l"
    if unread_only:
        return prefix + "unr"
    if starred_only:
        return prefix + "str"
    return prefix + "idx"


def canonical_label(label_id: str) -> str:
    """The label a listing names: "" (or "ALL", "ALL_MAIL") is All Mail; system labels in any case."""
    up = label_id.upper()
    if not label_id or up in ("ALL", "ALL_MAIL"):
        return keys.ALL
    if up in labels.SYSTEM_LABELS:
        return up
    return label_id


def label_for_list(mtx: MailTx, label_id: str) -> str:
    label = canonical_label(label_id)
    if not labels.exists(mtx, label):
        raise NotFound(f"label {label_id!r} not found")
    return label


def _rows(mtx: MailTx, idx: str, label: str, before: Cursor | None, limit: int) -> list[tuple[int, str]]:
    begin, end = keys.u_range(mtx.user, idx, label)
    if before is not None:
        end = keys.u(mtx.user, idx, label, before.ts, before.id)
    rows = mtx.tr.get_range(begin, end, limit=limit, reverse=True)
    return [(int(keys.unpack(k)[-2]), str(keys.unpack(k)[-1])) for k, _ in rows]


def page(mtx: MailTx, idx: str, label: str, page_size: int, cursor: Cursor | None,
         keep: Callable[[str], T | None]) -> tuple[list[T], Cursor | None]:
    """One page from a newest-first (ts, id) index: the items `keep` returns (None skips an
    entry), and the cursor to continue from (None on the last page). Reads O(page) entries when
    nothing is skipped; a filtering walk stops after MAX_SCAN entries and returns what it found
    with a cursor, so one call is always bounded."""
    out: list[T] = []
    pos = cursor
    scanned = 0
    while True:
        limit = page_size - len(out) + 1  # one more than needed: tells whether more follow
        rows = _rows(mtx, idx, label, pos, limit)
        for ts, item_id in rows:
            if len(out) == page_size:
                return out, pos
            pos = Cursor(ts=ts, id=item_id)
            scanned += 1
            item = keep(item_id)
            if item is not None:
                out.append(item)
        if len(rows) < limit:
            return out, None
        if scanned >= MAX_SCAN:
            return out, pos


def list_messages(mtx: MailTx, label_id: str, unread_only: bool, starred_only: bool, page_size: int,
                  cursor: Cursor | None) -> tuple[list[types_pb2.Message], Cursor | None, int, str]:
    label = label_for_list(mtx, label_id)

    def keep(msg_id: str) -> types_pb2.Message | None:
        raw = mtx.tr.get(keys.u(mtx.user, "msg", msg_id))
        if raw is None:
            return None
        m = types_pb2.Message.FromString(raw)
        # both filters: the unread index is walked and starred messages kept
        return None if unread_only and starred_only and not m.starred else m

    out, nxt = page(mtx, _index_for(unread_only, starred_only, False), label, page_size, cursor, keep)
    total = _estimate(mtx, label, unread_only, starred_only, ("unread", "starred", "total"),
                      len(out) if cursor is None and nxt is None else None)
    return out, nxt, total, label


def _estimate(mtx: MailTx, label: str, unread_only: bool, starred_only: bool, names: tuple[str, str, str],
              exact: int | None) -> int:
    """result_size_estimate: exact from the label's counters; with both filters, exact when the
    whole listing fit in one page, else the smaller of the two counts."""
    def ctr(name: str) -> int:
        return decode_counter(mtx.tr.get(keys.u(mtx.user, "lctr", label, name)))

    unread_name, starred_name, total_name = names
    if unread_only and starred_only:
        return exact if exact is not None else min(ctr(unread_name), ctr(starred_name))
    if unread_only:
        return ctr(unread_name)
    if starred_only:
        return ctr(starred_name)
    return ctr(total_name)


def _summaries(mtx: MailTx, thread_id: str) -> list[types_pb2.Message]:
    """The newest LIST_THREAD_MESSAGES messages of a thread, oldest first, without bodies."""
    begin, end = keys.u_range(mtx.user, "tmem", thread_id)
    rows = mtx.tr.get_range(begin, end, limit=LIST_THREAD_MESSAGES, reverse=True)
    out = []
    for k, _ in reversed(rows):
        raw = mtx.tr.get(keys.u(mtx.user, "msg", str(keys.unpack(k)[-1])))
        if raw is not None:
            out.append(types_pb2.Message.FromString(raw))
    return out


def list_threads(mtx: MailTx, label_id: str, unread_only: bool, starred_only: bool, page_size: int,
                 cursor: Cursor | None) -> tuple[list[types_pb2.Thread], Cursor | None, int, str]:
    label = label_for_list(mtx, label_id)

    def keep(tid: str) -> types_pb2.Thread | None:
        raw = mtx.tr.get(keys.u(mtx.user, "thr", tid))
        if raw is None:
            return None
        if unread_only and starred_only:
            stats = index.thread_label_stats(mtx, tid, label)
            if not stats or not stats[2]:
                return None
        thread = types_pb2.Thread.FromString(raw)
        thread.messages.extend(_summaries(mtx, tid))
        return thread

    out, nxt = page(mtx, _index_for(unread_only, starred_only, True), label, page_size, cursor, keep)
    total = _estimate(mtx, label, unread_only, starred_only, ("tunread", "tstarred", "threads"),
                      len(out) if cursor is None and nxt is None else None)
    return out, nxt, total, label


def get_thread(mtx: MailTx, thread_id: str) -> tuple[types_pb2.Thread, list[types_pb2.Message]]:
    tid = threads.resolve(mtx, thread_id) if thread_id and len(thread_id) <= 64 else None
    if tid is None:
        raise NotFound(f"thread {thread_id!r} not found")
    thread = types_pb2.Thread.FromString(mtx.tr.get(keys.u(mtx.user, "thr", tid)) or b"")
    return thread, index.thread_members(mtx, tid)


def release_blob(mtx: MailTx, ref: str) -> None:
    """Drops one reference; an unreferenced blob is marked for collection after a grace period."""
    blob_key = keys.g("blob", ref)
    mtx.tr.add(blob_key, -1)
    if decode_counter(mtx.tr.get(blob_key)) <= 0:
        mtx.tr.clear(blob_key)
        unmark_blob(mtx, ref)
        mtx.tr.set(keys.g("blobgc", mtx.now, ref), b"")
        mtx.tr.set(keys.g("blobgcref", ref), encode_counter(mtx.now))


def unmark_blob(mtx: MailTx, ref: str) -> None:
    """A blob referenced again is no longer due for collection."""
    marked = mtx.tr.get(keys.g("blobgcref", ref))
    if marked is not None:
        mtx.tr.clear(keys.g("blobgc", decode_counter(marked), ref))
        mtx.tr.clear(keys.g("blobgcref", ref))
