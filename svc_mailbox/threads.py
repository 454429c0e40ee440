"""Threading (DESIGN.md): References (newest ancestor first) and In-Reply-To, then the
normalized subject within 30 days with at least two participants in common.

Every Message-ID a message names — its own and the ones it references — is mapped to the
thread, so a reply that arrives before its parent reserves the parent's id and the parent joins
the reply's thread when it comes. A message that connects two existing threads merges them
(the smaller moves into the larger; a redirect keeps old thread ids resolvable).
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

_TS = struct.Struct(">q")


def new_id() -> str:
    """Time-ordered opaque id: 11 hex digits of milliseconds then 5 random hex digits."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(3)[:5]}"


def resolve(mtx: MailTx, thread_id: str) -> str | None:
    """Follows merge redirects; None when the thread does not exist."""
    for _ in range(16):
        if mtx.tr.get(keys.u(mtx.user, "thr", thread_id)) is not None:
            return thread_id
        redirect = mtx.tr.get(keys.u(mtx.user, "tredir", thread_id))
        if redirect is None:
            return None
        thread_id = redirect.decode()
    return None


def _id_key(mid: str) -> str:
    return mid.strip().lower()[:900]


def assign(mtx: MailTx, msg: types_pb2.Message, chain: list[str], people: set[str],
           norm_subject: str) -> str:
    """Chooses (or creates) the thread of a new message and registers its threading keys.
    Returns the thread id; merges threads the message connects."""
    tr, user = mtx.tr, mtx.user
    found: list[str] = []
    own = _id_key(msg.message_id_header) if msg.message_id_header else ""
    lookups = ([own] if own else []) + [_id_key(r) for r in chain[:MAX_REFS]]
    for mid in lookups:
        raw = tr.get(keys.u(user, "mid", mid))
        if raw is None:
            continue
        tid = resolve(mtx, raw.decode())
        if tid is not None and tid not in found:
            found.append(tid)
    if found:
        target = _largest(mtx, found)
        for other in found:
            if other != target:
                merge(mtx, other, target)
    else:
        target = _by_subject(mtx, norm_subject, people) or ""
    if not target:
        target = new_id()
        thread = types_pb2.Thread(id=target, subject=msg.subject)
        tr.set(keys.u(user, "thr", target), thread.SerializeToString())
    for mid in lookups:
        tr.set(keys.u(user, "mid", mid), target.encode())
    if norm_subject:
        _remember_subject(mtx, norm_subject, target, index.ts_of(msg), people)
    return target


def _largest(mtx: MailTx, threads: list[str]) -> str:
    best, best_n = threads[0], -1
    for tid in threads:
        raw = mtx.tr.get(keys.u(mtx.user, "thr", tid))
        n = types_pb2.Thread.FromString(raw).message_count if raw else 0
        if n > best_n:
            best, best_n = tid, n
    return best


def _subject_key(norm: str) -> str:
    return norm[:MAX_SUBJECT_KEY]


def _remember_subject(mtx: MailTx, norm: str, thread_id: str, ts: int, people: set[str]) -> None:
    key = keys.u(mtx.user, "subj", _subject_key(norm), thread_id)
    prev = mtx.tr.get(key)
    known: set[str] = set()
    prev_ts = 0
    if prev:
        prev_ts = _TS.unpack(prev[:8])[0]
        known = set(filter(None, prev[8:].decode().split("\n")))
    merged = sorted(known | people)[:MAX_PARTICIPANTS]
    mtx.tr.set(key, _TS.pack(max(ts, prev_ts)) + "\n".join(merged).encode())


def _by_subject(mtx: MailTx, norm: str, people: set[str]) -> str | None:
    if not norm:
        return None
    begin, end = keys.u_range(mtx.user, "subj", _subject_key(norm))
    best: tuple[int, str] | None = None
    for k, v in mtx.tr.get_range(begin, end, limit=MAX_SUBJECT_CANDIDATES, reverse=True):
        ts = _TS.unpack(v[:8])[0]
        if mtx.now - ts > SUBJECT_WINDOW_US:
            continue
        known = set(filter(None, v[8:].decode().split("\n")))
        if len(known & people) < MIN_SHARED_PARTICIPANTS:
            continue
        tid = resolve(mtx, keys.unpack(k)[-1])
        if tid is None:
            continue
        raw = mtx.tr.get(keys.u(mtx.user, "thr", tid))
        if raw and types_pb2.Thread.FromString(raw).message_count >= MAX_THREAD_SIZE:
            continue
        if best is None or ts > best[0]:
            best = (ts, tid)
    return best[1] if best else None


def merge(mtx: MailTx, source: str, target: str) -> None:
    """Moves every message of `source` into `target` and leaves a redirect."""
    members = index.thread_members(mtx, source)
    for m in members:
        old = types_pb2.Message()
        old.CopyFrom(m)
        m.thread_id = target
        index.apply(mtx, old, m, types_pb2.CHANGE_TYPE_THREAD_CHANGED)
    mtx.tr.clear(keys.u(mtx.user, "thr", source))
    mtx.tr.set(keys.u(mtx.user, "tredir", source), target.encode())
