"""Keeps every secondary structure of a message in step with its record, in one transaction.

`apply(mtx, old, new)` compares a message before and after a change (either may be None) and
updates: per-label list/unread/starred indexes (newest first by received time), per-label
counters (total, unread, starred, threads, threads with unread / starred messages, UIDNEXT,
HIGHESTMODSEQ), per-label UIDs, the thread's member indexes (all members, and per label), the
per-(thread, label) stats and thread list indexes, the thread summary, the mailbox totals and
quota usage. List and unread filtering then cost O(page), and a change costs O(labels of the
message) however long its thread is: never a scan.
"""

from __future__ import annotations

import struct

from mailmesh.v1 import types_pb2

from mailmesh_common.kv import decode_counter, encode_counter
from svc_mailbox import keys
from svc_mailbox.txn import MailTx

SPAM, TRASH, STARRED = "SPAM", "TRASH", "STARRED"
ANY = "*"  # pseudo-label of thread stats covering every member (SPAM and TRASH too)
MAX_THREAD_SCAN = 5000

_TL = struct.Struct(">qqqq")  # count, unread, starred, newest ts (µs)


def ts_of(msg: types_pb2.Message) -> int:
    return msg.internal_date.seconds * 1_000_000 + msg.internal_date.nanos // 1000


def index_labels(msg: types_pb2.Message | None) -> set[str]:
    """Labels whose indexes hold the message: its labels plus "All Mail" unless SPAM/TRASH."""
    if msg is None:
        return set()
    labels = set(msg.label_ids)
    if SPAM not in labels and TRASH not in labels:
        labels.add(keys.ALL)
    return labels


def apply(mtx: MailTx, old: types_pb2.Message | None, new: types_pb2.Message | None,
          change_type: types_pb2.ChangeType.ValueType,
          pending_threads: dict[str, set[str]] | None = None) -> types_pb2.Change:
    """Moves a message from `old` to `new` (same id; None = absent): writes the record, records
    the change in the changelog (assigning its MODSEQ), and updates every index.

    The (thread, label) stats change by the message's own difference (never a walk over the
    thread). The thread summary is refreshed right away, or, when a batch passes
    `pending_threads`, collected there and refreshed once per thread by `refresh_threads`."""
    tr, user = mtx.tr, mtx.user
    msg_id = (new or old).id  # type: ignore[union-attr]
    old_l, new_l = index_labels(old), index_labels(new)
    old_ts = ts_of(old) if old is not None else 0
    new_ts = ts_of(new) if new is not None else 0
    for label in old_l - new_l:
        assert old is not None
        tr.clear(keys.u(user, "lidx", label, old_ts, msg_id))
        mtx.add(-1, "lctr", label, "total")
        if old.unread:
            tr.clear(keys.u(user, "lunr", label, old_ts, msg_id))
            mtx.add(-1, "lctr", label, "unread")
        if old.starred:
            tr.clear(keys.u(user, "lstr", label, old_ts, msg_id))
            mtx.add(-1, "lctr", label, "starred")
        uid = old.uids.get(label)
        if uid:
            tr.clear(keys.u(user, "uid", label, uid))
        if new is not None and label in new.uids:
            del new.uids[label]
    for label in new_l - old_l:
        assert new is not None
        uid_key = keys.u(user, "lctr", label, "uidnext")
        uid = max(decode_counter(tr.get(uid_key)), 1)
        tr.set(uid_key, encode_counter(uid + 1))
        new.uids[label] = uid
        tr.set(keys.u(user, "uid", label, uid), msg_id.encode())
        tr.set(keys.u(user, "lidx", label, new_ts, msg_id), b"")
        mtx.add(1, "lctr", label, "total")
        if new.unread:
            tr.set(keys.u(user, "lunr", label, new_ts, msg_id), b"")
            mtx.add(1, "lctr", label, "unread")
        if new.starred:
            tr.set(keys.u(user, "lstr", label, new_ts, msg_id), b"")
            mtx.add(1, "lctr", label, "starred")
    for label in old_l & new_l:
        assert old is not None and new is not None
        if old.unread != new.unread or old_ts != new_ts:
            if old.unread:
                tr.clear(keys.u(user, "lunr", label, old_ts, msg_id))
            if new.unread:
                tr.set(keys.u(user, "lunr", label, new_ts, msg_id), b"")
            mtx.add(int(new.unread) - int(old.unread), "lctr", label, "unread")
        if old.starred != new.starred or old_ts != new_ts:
            if old.starred:
                tr.clear(keys.u(user, "lstr", label, old_ts, msg_id))
            if new.starred:
                tr.set(keys.u(user, "lstr", label, new_ts, msg_id), b"")
            mtx.add(int(new.starred) - int(old.starred), "lctr", label, "starred")
        if old_ts != new_ts:
            tr.clear(keys.u(user, "lidx", label, old_ts, msg_id))
            tr.set(keys.u(user, "lidx", label, new_ts, msg_id), b"")
    old_labels = set(old.label_ids) if old is not None else set()
    new_labels = set(new.label_ids) if new is not None else set()
    if new is not None:
        change = mtx.change(change_type, message=new, added=new_labels - old_labels,
                            removed=old_labels - new_labels)
        tr.set(keys.u(user, "msg", msg_id), new.SerializeToString())
    else:
        assert old is not None
        change = mtx.change(change_type, message=old, removed=old_labels, uids=dict(old.uids))
        tr.clear(keys.u(user, "msg", msg_id))
    for label in old_l | new_l:
        tr.set(keys.u(user, "lctr", label, "hms"), _u64(change.modseq))
    # mailbox totals and quota
    if old is None and new is not None:
        mtx.add(1, "ctr", "total")
        mtx.add(new.size_estimate, "ctr", "used")
    elif new is None and old is not None:
        mtx.add(-1, "ctr", "total")
        mtx.add(-old.size_estimate, "ctr", "used")
    # threads: member index, per-(thread, label) stats and thread lists, then the summary
    old_thread = old.thread_id if old is not None else ""
    new_thread = new.thread_id if new is not None else ""
    if old_thread and (old_thread != new_thread or old_ts != new_ts):
        tr.clear(keys.u(user, "tmem", old_thread, old_ts, msg_id))
    if new_thread and (old_thread != new_thread or old_ts != new_ts):
        tr.set(keys.u(user, "tmem", new_thread, new_ts, msg_id), b"")
    todo: dict[str, set[str]] = {} if pending_threads is None else pending_threads
    _thread_stats(mtx, old, new, msg_id, todo)
    if pending_threads is None:
        refresh_threads(mtx, todo)
    return change


def _contributions(m: types_pb2.Message | None) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(thread, label) → (unread, starred, ts) of what one message adds to thread stats."""
    if m is None or not m.thread_id:
        return {}
    value = (int(m.unread), int(m.starred), ts_of(m))
    return {(m.thread_id, label): value for label in index_labels(m) | {ANY}}


def _newest(mtx: MailTx, thread_id: str, label: str) -> tuple[int, str] | None:
    begin, end = keys.u_range(mtx.user, "tlm", thread_id, label)
    rows = mtx.tr.get_range(begin, end, limit=1, reverse=True)
    if not rows:
        return None
    t = keys.unpack(rows[0][0])
    return int(t[-2]), str(t[-1])


def _thread_stats(mtx: MailTx, old: types_pb2.Message | None, new: types_pb2.Message | None, msg_id: str,
                  touched: dict[str, set[str]]) -> None:
    """Updates the (thread, label) stats by the difference one message makes: O(labels), never
    a walk over the thread, however long it is."""
    tr, user = mtx.tr, mtx.user
    before, after = _contributions(old), _contributions(new)
    for key in before.keys() | after.keys():
        o, n = before.get(key), after.get(key)
        if o == n:
            continue
        thread_id, label = key
        if o is not None:
            tr.clear(keys.u(user, "tlm", thread_id, label, o[2], msg_id))
        if n is not None:
            tr.set(keys.u(user, "tlm", thread_id, label, n[2], msg_id), b"")
        raw = tr.get(keys.u(user, "tl", thread_id, label))
        prev = _TL.unpack(raw) if raw else (0, 0, 0, 0)
        count = prev[0] - (o is not None) + (n is not None)
        unread = prev[1] - (o[0] if o else 0) + (n[0] if n else 0)
        starred = prev[2] - (o[1] if o else 0) + (n[1] if n else 0)
        # the newest member time follows from the stored one, unless the member that held it
        # left or moved back in time: only then are the members read
        if not count:
            newest = 0
        elif o is not None and o[2] >= prev[3] and (n is None or n[2] < o[2]):
            found = _newest(mtx, thread_id, label)
            newest = found[0] if found else 0
        elif n is None:
            newest = prev[3]
        else:
            newest = max(prev[3], n[2]) if prev[0] else n[2]
        if label == ANY:
            # the thread summary's newest member, when this change makes it known
            if new is not None and n is not None and (not prev[0] or n[2] > prev[3]):
                mtx.newest[thread_id] = new
            else:
                mtx.newest.pop(thread_id, None)
        _store_stats(mtx, thread_id, label, prev, (count, unread, starred, newest))
        touched.setdefault(thread_id, set()).add(label)


def _store_stats(mtx: MailTx, thread_id: str, label: str, prev: tuple[int, int, int, int],
                 cur: tuple[int, int, int, int]) -> None:
    """Writes (thread, label) stats and keeps the label's thread lists and counters in step."""
    tr, user = mtx.tr, mtx.user
    if prev == cur:
        return
    count, unread, starred, newest = cur
    p_count, p_unread, p_starred, p_newest = prev
    key = keys.u(user, "tl", thread_id, label)
    if count:
        tr.set(key, _TL.pack(*cur))
    else:
        tr.clear(key)
    if label == ANY:
        return  # the thread summary's own stats: not a listable label
    if p_count:
        tr.clear(keys.u(user, "tidx", label, p_newest, thread_id))
        if p_unread:
            tr.clear(keys.u(user, "tunr", label, p_newest, thread_id))
        if p_starred:
            tr.clear(keys.u(user, "tstr", label, p_newest, thread_id))
    # threads in the label, and those with an unread / a starred message there
    mtx.add(int(count > 0) - int(p_count > 0), "lctr", label, "threads")
    mtx.add(int(count > 0 and unread > 0) - int(p_count > 0 and p_unread > 0), "lctr", label, "tunread")
    mtx.add(int(count > 0 and starred > 0) - int(p_count > 0 and p_starred > 0), "lctr", label, "tstarred")
    if count:
        tr.set(keys.u(user, "tidx", label, newest, thread_id), b"")
        if unread:
            tr.set(keys.u(user, "tunr", label, newest, thread_id), b"")
        if starred:
            tr.set(keys.u(user, "tstr", label, newest, thread_id), b"")


def refresh_threads(mtx: MailTx, pending: dict[str, set[str]]) -> None:
    """Brings the summary (Thread record) of every thread a batch touched up to date: once per
    thread, from its stats (see `apply`)."""
    for thread_id in pending:
        refresh_summary(mtx, thread_id)
    pending.clear()


def refresh_summary(mtx: MailTx, thread_id: str) -> None:
    """The Thread record follows its members: count, unread, newest snippet and time, labels
    (the union of its members' labels), history id. A thread left without members is removed."""
    tr, user = mtx.tr, mtx.user
    key = keys.u(user, "thr", thread_id)
    hint = mtx.newest.pop(thread_id, None)
    raw = tr.get(key)
    if raw is None:
        return
    stats = thread_label_stats(mtx, thread_id, ANY)
    newest_msg = hint if stats else None
    if newest_msg is None:
        newest = _newest(mtx, thread_id, ANY) if stats else None
        newest_raw = tr.get(keys.u(user, "msg", newest[1])) if newest else None
        if stats is None or newest_raw is None:
            tr.clear(key)
            return
        newest_msg = types_pb2.Message.FromString(newest_raw)
    assert stats is not None
    thread = types_pb2.Thread.FromString(raw)
    thread.message_count = stats[0]
    thread.unread = stats[1] > 0
    thread.snippet = newest_msg.snippet
    thread.last_message_time.CopyFrom(newest_msg.internal_date)
    thread.history_id = max(thread.history_id, mtx.current_modseq())
    begin, end = keys.u_range(user, "tl", thread_id)
    in_labels = (str(keys.unpack(k)[-1]) for k, _ in tr.get_range(begin, end))
    del thread.label_ids[:]
    thread.label_ids.extend(sorted(lb for lb in in_labels if lb not in (ANY, keys.ALL)))
    tr.set(key, thread.SerializeToString())


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def read_u64(b: bytes | None) -> int:
    return struct.unpack("<Q", b)[0] if b else 0


def thread_members(mtx: MailTx, thread_id: str, limit: int = MAX_THREAD_SCAN) -> list[types_pb2.Message]:
    begin, end = keys.u_range(mtx.user, "tmem", thread_id)
    out = []
    for k, _ in mtx.tr.get_range(begin, end, limit=limit):
        msg_id = keys.unpack(k)[-1]
        raw = mtx.tr.get(keys.u(mtx.user, "msg", msg_id))
        if raw is not None:
            out.append(types_pb2.Message.FromString(raw))
    return out


def thread_label_stats(mtx: MailTx, thread_id: str, label: str) -> tuple[int, int, int, int] | None:
    raw = mtx.tr.get(keys.u(mtx.user, "tl", thread_id, label))
    return _TL.unpack(raw) if raw else None
