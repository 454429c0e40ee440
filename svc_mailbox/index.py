"""Keeps every secondary structure of a message in step with its record, in one transaction.

`apply(mtx, old, new)` compares a message before and after a change (either may be None) and
updates: per-label list/unread/starred indexes (newest first by received time), per-label
counters (total, unread, threads, UIDNEXT, HIGHESTMODSEQ), per-label UIDs, the thread's
member index, per-(thread, label) stats and the thread list indexes, the mailbox totals and
quota usage. List and unread filtering then cost O(page), never a scan.
"""

from __future__ import annotations

import struct

from mailmesh.v1 import types_pb2

from mailmesh_common.kv import decode_counter, encode_counter
from svc_mailbox import keys
from svc_mailbox.txn import MailTx

SPAM, TRASH, STARRED = "SPAM", "TRASH", "STARRED"
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
          change_type: types_pb2.ChangeType.ValueType) -> types_pb2.Change:
    """Moves a message from `old` to `new` (same id; None = absent): writes the record, records
    the change in the changelog (assigning its MODSEQ), and updates every index."""
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
    # threads
    old_thread = old.thread_id if old is not None else ""
    new_thread = new.thread_id if new is not None else ""
    if old_thread and old_thread != new_thread:
        tr.clear(keys.u(user, "tmem", old_thread, old_ts, msg_id))
    if new_thread and (old_thread != new_thread or old_ts != new_ts):
        if old_thread == new_thread:
            tr.clear(keys.u(user, "tmem", old_thread, old_ts, msg_id))
        tr.set(keys.u(user, "tmem", new_thread, new_ts, msg_id), b"")
    if old_thread and old_thread != new_thread:
        refresh_thread(mtx, old_thread, old_l)
    if new_thread:
        refresh_thread(mtx, new_thread, old_l | new_l if old_thread == new_thread else new_l)
    return change


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


def refresh_thread(mtx: MailTx, thread_id: str, labels: set[str]) -> None:
    """Recomputes the (thread, label) stats and thread-list index entries for `labels`."""
    tr, user = mtx.tr, mtx.user
    members = thread_members(mtx, thread_id)
    stats: dict[str, list[int]] = {label: [0, 0, 0, 0] for label in labels}
    for m in members:
        ts = ts_of(m)
        for label in index_labels(m) & labels:
            s = stats[label]
            s[0] += 1
            s[1] += int(m.unread)
            s[2] += int(m.starred)
            s[3] = max(s[3], ts)
    for label, (count, unread, starred, newest) in stats.items():
        key = keys.u(user, "tl", thread_id, label)
        prev = tr.get(key)
        if prev is not None:
            p_count, p_unread, p_starred, p_newest = _TL.unpack(prev)
            if (p_count, p_unread, p_starred, p_newest) == (count, unread, starred, newest):
                continue
            tr.clear(keys.u(user, "tidx", label, p_newest, thread_id))
            if p_unread:
                tr.clear(keys.u(user, "tunr", label, p_newest, thread_id))
            if p_starred:
                tr.clear(keys.u(user, "tstr", label, p_newest, thread_id))
            if not count:
                mtx.add(-1, "lctr", label, "threads")
        elif count:
            mtx.add(1, "lctr", label, "threads")
        if not count:
            tr.clear(key)
            continue
        tr.set(key, _TL.pack(count, unread, starred, newest))
        tr.set(keys.u(user, "tidx", label, newest, thread_id), b"")
        if unread:
            tr.set(keys.u(user, "tunr", label, newest, thread_id), b"")
        if starred:
            tr.set(keys.u(user, "tstr", label, newest, thread_id), b"")
    # the thread summary follows its members
    raw = tr.get(keys.u(user, "thr", thread_id))
    if raw is None:
        return
    thread = types_pb2.Thread.FromString(raw)
    if not members:
        tr.clear(keys.u(user, "thr", thread_id))
        return
    newest_msg = max(members, key=ts_of)
    thread.message_count = len(members)
    thread.snippet = newest_msg.snippet
    thread.history_id = max(m.history_id for m in members)
    thread.last_message_time.CopyFrom(newest_msg.internal_date)
    thread.unread = any(m.unread for m in members)
    del thread.label_ids[:]
    thread.label_ids.extend(sorted({lb for m in members for lb in m.label_ids}))
    tr.set(keys.u(user, "thr", thread_id), thread.SerializeToString())


def thread_label_stats(mtx: MailTx, thread_id: str, label: str) -> tuple[int, int, int, int] | None:
    raw = mtx.tr.get(keys.u(mtx.user, "tl", thread_id, label))
    return _TL.unpack(raw) if raw else None
