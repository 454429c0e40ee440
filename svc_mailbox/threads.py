"""Threading (DESIGN.md): References (newest ancestor first) and In-Reply-To, then the
normalized subject within 30 days with at least two participants in common.

Every Message-ID a message names — its own and the ones it references — is mapped to the
thread, so a reply that arrives before its parent reserves the parent's id and the parent joins
the reply's thread when it comes. A message that connects two existing threads merges them
(the smaller moves into the larger; a redirect ("tredir", old id) → new id keeps old thread ids
resolvable). The 30-day window is measured between the new message's internal date and the
dates of the candidate thread's messages with that subject, never against the wall clock, so
imported or delayed mail threads the same as live mail.
"""

from __future__ import annotations

import secrets
import struct
import time

from mailmesh.v1 import types_pb2

from svc_mailbox import index, keys
from svc_mailbox.txn import MailTx

SUBJECT_WINDOW_US = 30 * 86400 * 1_000_000
MIN_SHARED_PARTICIPANTS = 2
MAX_SUBJECT_KEY = 200
MAX_PARTICIPANTS = 50
MAX_REFS = 50
MAX_SUBJECT_CANDIDATES = 20
MAX_THREAD_SIZE = 5000
# Messages moved by merges in one transaction: keeps a merge inside FoundationDB's 10 MB / 5 s.
# Threads larger than this are left apart (the connecting message joins the larger one).
MAX_MERGE = 1000
MAX_REDIRECTS = 32

# subject entry value: newest ts, oldest ts (µs), then "\n"-joined participants
_SUBJ = struct.Struct(">qq")


def new_id() -> str:
    """Time-ordered opaque id: 11 hex digits of milliseconds then 5 random hex digits."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(3)[:5]}"


def resolve(mtx: MailTx, thread_id: str) -> str | None:
    """Follows merge redirects; None when the thread does not exist."""
    for _ in range(MAX_REDIRECTS):
        if mtx.tr.get(keys.u(mtx.user, "thr", thread_id)) is not None:
            return thread_id
        redirect = mtx.tr.get(keys.u(mtx.user, "tredir", thread_id))
        if redirect is None:
            return None
        thread_id = redirect.decode()
    return None


def _id_key(mid: str) -> str:
    return mid.strip().lower()[:900]


def _count(mtx: MailTx, thread_id: str) -> int:
    raw = mtx.tr.get(keys.u(mtx.user, "thr", thread_id))
    return types_pb2.Thread.FromString(raw).message_count if raw else 0


def assign(mtx: MailTx, msg: types_pb2.Message, chain: list[str], people: set[str],
           norm_subject: str) -> str:
    """Chooses (or creates) the thread of a new message and registers its threading keys.
    Returns the thread id; merges threads the message connects."""
    tr, user = mtx.tr, mtx.user
    ts = index.ts_of(msg)
    own = _id_key(msg.message_id_header) if msg.message_id_header else ""
    lookups = list(dict.fromkeys(([own] if own else []) + [_id_key(r) for r in chain[:MAX_REFS] if r.strip()]))
    found: list[str] = []
    where: dict[str, str | None] = {}  # lookup → thread it resolves to now (None: unknown id)
    for mid in lookups:
        raw = tr.get(keys.u(user, "mid", mid))
        tid = resolve(mtx, raw.decode()) if raw is not None else None
        where[mid] = tid
        if tid is not None and tid not in found:
            found.append(tid)
    merged: set[str] = set()
    if found:
        target = _largest(mtx, found)
        budget = MAX_MERGE
        for other in sorted((t for t in found if t != target), key=lambda t: _count(mtx, t)):
            n = _count(mtx, other)
            if n > budget:
                continue  # too large to move in this transaction: the threads stay apart
            budget -= n
            merge(mtx, other, target)
            merged.add(other)
    else:
        target = _by_subject(mtx, norm_subject, people, ts) or ""
    created = not target
    if created:
        target = new_id()
        thread = types_pb2.Thread(id=target, subject=msg.subject)
        tr.set(keys.u(user, "thr", target), thread.SerializeToString())
    else:
        _keep_first_subject(mtx, target, msg, ts, bool(merged))
    for mid in lookups:
        tid = where[mid]
        # ids of threads we could not merge keep pointing at their own thread
        if tid is None or tid == target or tid in merged:
            tr.set(keys.u(user, "mid", mid), target.encode())
    if norm_subject:
        _remember_subject(mtx, norm_subject, target, ts, people, created=created)
    return target


def _keep_first_subject(mtx: MailTx, thread_id: str, msg: types_pb2.Message, ts: int, merged: bool) -> None:
    """Thread.subject is the subject of the thread's oldest message: a parent that arrives after
    its replies, or a merge, can change which message that is."""
    key = keys.u(mtx.user, "thr", thread_id)
    raw = mtx.tr.get(key)
    if raw is None:
        return
    thread = types_pb2.Thread.FromString(raw)
    begin, end = keys.u_range(mtx.user, "tmem", thread_id)
    first = mtx.tr.get_range(begin, end, limit=1)
    if not first:
        subject = msg.subject
    else:
        oldest_ts, oldest_id = keys.unpack(first[0][0])[-2:]
        if ts < int(oldest_ts):
            subject = msg.subject
        elif merged:
            rec = mtx.tr.get(keys.u(mtx.user, "msg", str(oldest_id)))
            subject = types_pb2.Message.FromString(rec).subject if rec else thread.subject
        else:
            return
    if subject != thread.subject:
        thread.subject = subject
        mtx.tr.set(key, thread.SerializeToString())


def _largest(mtx: MailTx, threads: list[str]) -> str:
    best, best_n = threads[0], -1
    for tid in threads:
        n = _count(mtx, tid)
        if n > best_n:
            best, best_n = tid, n
    return best


def _subject_key(norm: str) -> str:
    return norm[:MAX_SUBJECT_KEY]


def _decode_subject(v: bytes) -> tuple[int, int, set[str]]:
    newest, oldest = _SUBJ.unpack(v[:_SUBJ.size])
    return newest, oldest, set(filter(None, v[_SUBJ.size:].decode().split("\n")))


def _remember_subject(mtx: MailTx, norm: str, thread_id: str, ts: int, people: set[str], *,
                      created: bool = False) -> None:
    """Adds the message's time and participants to the thread's entry for its subject (a thread
    `created` by this message has none yet)."""
    key = keys.u(mtx.user, "subj", _subject_key(norm), thread_id)
    prev = None if created else mtx.tr.get(key)
    newest, oldest, known = _decode_subject(prev) if prev else (ts, ts, set())
    merged = sorted(known | people)[:MAX_PARTICIPANTS]
    mtx.tr.set(key, _SUBJ.pack(max(ts, newest), min(ts, oldest)) + "\n".join(merged).encode())


def _by_subject(mtx: MailTx, norm: str, people: set[str], ts: int) -> str | None:
    """The thread with this normalized subject, sharing at least two participants with the new
    message, whose messages with that subject are within 30 days of the new message's date."""
    if not norm:
        return None
    begin, end = keys.u_range(mtx.user, "subj", _subject_key(norm))
    best: tuple[int, str] | None = None
    for k, v in mtx.tr.get_range(begin, end, limit=MAX_SUBJECT_CANDIDATES, reverse=True):
        newest, oldest, known = _decode_subject(v)
        if ts > newest + SUBJECT_WINDOW_US or ts < oldest - SUBJECT_WINDOW_US:
            continue
        if len(known & people) < MIN_SHARED_PARTICIPANTS:
            continue
        tid = resolve(mtx, str(keys.unpack(k)[-1]))
        if tid is None:
            continue
        if _count(mtx, tid) >= MAX_THREAD_SIZE:
            continue
        distance = 0 if oldest <= ts <= newest else min(abs(ts - newest), abs(ts - oldest))
        if best is None or distance < best[0]:
            best = (distance, tid)
    return best[1] if best else None


def merge(mtx: MailTx, source: str, target: str) -> None:
    """Moves every message of `source` into `target` (one THREAD_CHANGED change each) and leaves
    a redirect. The thread stats of both threads are recomputed once for the whole move, not once
    per moved message (which made merging two 300-message threads take seconds)."""
    pending: dict[str, set[str]] = {}
    for m in index.thread_members(mtx, source):
        old = types_pb2.Message()
        old.CopyFrom(m)
        m.thread_id = target
        index.apply(mtx, old, m, types_pb2.CHANGE_TYPE_THREAD_CHANGED, pending_threads=pending)
    index.refresh_threads(mtx, pending)
    mtx.tr.clear(keys.u(mtx.user, "thr", source))
    mtx.tr.set(keys.u(mtx.user, "tredir", source), target.encode())
