"""Long operations as sequences of small transactions that resume after a crash: deleting a
label (removing it from every message), emptying TRASH or SPAM, deleting an account, and
rebuilding a mailbox's counters. Each job is recorded in the KV store first; every batch commits
its progress; `resume` finishes jobs a crash interrupted. No step comes near FoundationDB's
5 s / 10 MB transaction limits.

The last step of an account deletion writes, in the same transaction that clears the account's
last keys, an account-deleted MailboxEvent to the global ("gone", user) outbox; the EVENTS relay
publishes it on the user's subject (so search, push and IMAP drop the user) and then clears it.
"""

from __future__ import annotations

import json
from typing import Any

from mailmesh.v1 import events_pb2, types_pb2

from mailmesh_common import address
from mailmesh_common.errors import InvalidInput, NotFound, PermissionDenied
from mailmesh_common.kv import Transaction, encode_counter
from svc_mailbox import index, keys, labels, messages
from svc_mailbox.txn import MailTx, ts_from_us

BATCH = 100
DELETE_BATCH = 200  # messages released per step of an account deletion
CLEAR_BATCH = 2000  # keys cleared per step of an account deletion
COUNT_BATCH = 5000  # index entries counted per step of a recount
COUNTED = (("lidx", "total"), ("lunr", "unread"), ("lstr", "starred"),
           ("tidx", "threads"), ("tunr", "tunread"), ("tstr", "tstarred"))


def start_delete_label(mtx: MailTx, label_id: str) -> str:
    label = labels.load(mtx, label_id)
    if label.type != types_pb2.LABEL_TYPE_USER:
        raise PermissionDenied(f"system label {label_id} cannot be deleted")
    tr = mtx.tr
    tr.clear(keys.u(mtx.user, "lbl", label_id))
    tr.clear(keys.u(mtx.user, "lname", label.name.casefold()))
    mtx.add(-1, "ctr", "userlabels")
    mtx.change(types_pb2.CHANGE_TYPE_LABEL_DELETED, label_id=label_id)
    job_id = f"dellabel:{label_id}"
    tr.set(keys.g("jobs", mtx.user, job_id), json.dumps({"kind": "delete_label", "label": label_id}).encode())
    return job_id


def start_empty(mtx: MailTx, label_id: str) -> str:
    if label_id not in ("TRASH", "SPAM"):
        raise InvalidInput("only TRASH and SPAM can be emptied")
    job_id = f"empty:{label_id}"
    mtx.tr.set(keys.g("jobs", mtx.user, job_id), json.dumps({"kind": "empty", "label": label_id}).encode())
    return job_id


def _save(mtx: MailTx, job_id: str, job: dict[str, Any]) -> None:
    mtx.tr.set(keys.g("jobs", mtx.user, job_id), json.dumps(job).encode())


def start_delete_account(mtx: MailTx) -> str:
    """Takes the account out of service at once (no address resolves, no login, no delivery),
    then `step` releases its messages and clears its keys in bounded batches."""
    tr = mtx.tr
    raw = tr.get(keys.u(mtx.user, "acct"))
    if raw is None or tr.get(keys.u(mtx.user, "deleting")) is not None:
        raise NotFound("no such user")
    acct = types_pb2.Account.FromString(raw)
    for a in acct.addresses:
        if tr.get(keys.g("addr", a)) == mtx.user.encode():
            tr.clear(keys.g("addr", a))
    _, domain = address.split(acct.email)
    tr.clear(keys.g("acct", acct.email))
    tr.clear(keys.g("acctdom", domain, acct.email))
    tr.add(keys.g("domctr", domain), -1)
    tr.set(keys.u(mtx.user, "deleting"), b"")
    job_id = "delaccount"
    _save(mtx, job_id, {"kind": "delete_account", "phase": "messages", "deleted": 0,
                        "last_modseq": mtx.current_modseq()})
    return job_id


def account_deleted_event(user: str, last_modseq: int, now_us: int, traceparent: str = "") -> events_pb2.MailboxEvent:
    """The EVENTS payload announcing that `user`'s account and mail are gone."""
    return events_pb2.MailboxEvent(account_deleted=events_pb2.AccountDeleted(
        user_id=user, last_modseq=last_modseq, time=ts_from_us(now_us), traceparent=traceparent))


def start_recount(mtx: MailTx) -> str:
    if mtx.tr.get(keys.u(mtx.user, "acct")) is None:
        raise NotFound("no such user")
    b, e = keys.u_range(mtx.user, "lbl")
    label_ids = [str(keys.unpack(k)[-1]) for k, _ in mtx.tr.get_range(b, e)]
    queue = [[lid, fam, counter] for lid in label_ids for fam, counter in COUNTED]
    job_id = "recount"
    _save(mtx, job_id, {"kind": "recount", "queue": queue, "after": "", "n": 0,
                        "msgs_after": "", "total": 0, "used": 0})
    return job_id


def _step_delete_account(mtx: MailTx, job_id: str, job: dict[str, Any]) -> tuple[bool, int]:
    tr = mtx.tr
    if job["phase"] == "messages":
        b, e = keys.u_range(mtx.user, "msg")
        rows = tr.get_range(b, e, limit=DELETE_BATCH)
        for k, v in rows:
            messages.release_blob(mtx, types_pb2.Message.FromString(v).blob_ref)
            tr.clear(k)
        job["deleted"] += len(rows)
        if len(rows) < DELETE_BATCH:
            job["phase"] = "keys"
        _save(mtx, job_id, job)
        return False, len(rows)
    b, e = keys.u_range(mtx.user)
    rows = tr.get_range(b, e, limit=CLEAR_BATCH)
    if rows:
        tr.clear_range(rows[0][0], rows[-1][0] + b"\x00")
    if len(rows) < CLEAR_BATCH:
        tr.clear(keys.g("dirty", mtx.user))
        tr.clear(keys.g("relay", mtx.user))
        tr.clear(keys.g("jobs", mtx.user, job_id))
        # the outbox entry the relay turns into the user's last event (see the module docstring)
        event = account_deleted_event(mtx.user, int(job.get("last_modseq", 0)), mtx.now, mtx.traceparent)
        tr.set(keys.g("gone", mtx.user), event.SerializeToString())
        return True, 0
    return False, 0


def _step_recount(mtx: MailTx, job_id: str, job: dict[str, Any]) -> tuple[bool, int]:
    tr = mtx.tr
    if job["queue"]:
        label, family, counter = job["queue"][0]
        b, e = keys.u_range(mtx.user, family, label)
        if job["after"]:
            b = bytes.fromhex(job["after"]) + b"\x00"
        rows = tr.get_range(b, e, limit=COUNT_BATCH)
        job["n"] += len(rows)
        if len(rows) < COUNT_BATCH:
            tr.set(keys.u(mtx.user, "lctr", label, counter), encode_counter(job["n"]))
            job["queue"].pop(0)
            job["after"], job["n"] = "", 0
        else:
            job["after"] = rows[-1][0].hex()
        _save(mtx, job_id, job)
        return False, 0
    b, e = keys.u_range(mtx.user, "msg")
    if job["msgs_after"]:
        b = bytes.fromhex(job["msgs_after"]) + b"\x00"
    rows = tr.get_range(b, e, limit=BATCH * 10)
    for _, v in rows:
        job["total"] += 1
        job["used"] += types_pb2.Message.FromString(v).size_estimate
    if len(rows) < BATCH * 10:
        tr.set(keys.u(mtx.user, "ctr", "total"), encode_counter(job["total"]))
        tr.set(keys.u(mtx.user, "ctr", "used"), encode_counter(job["used"]))
        tr.clear(keys.g("jobs", mtx.user, job_id))
        return True, job["total"]
    job["msgs_after"] = rows[-1][0].hex()
    _save(mtx, job_id, job)
    return False, 0


def step(mtx: MailTx, job_id: str) -> tuple[bool, int]:
    """Runs one bounded batch of a job; returns (finished, messages affected)."""
    tr = mtx.tr
    raw = tr.get(keys.g("jobs", mtx.user, job_id))
    if raw is None:
        return True, 0
    job = json.loads(raw)
    if job["kind"] == "delete_account":
        return _step_delete_account(mtx, job_id, job)
    if job["kind"] == "recount":
        return _step_recount(mtx, job_id, job)
    label = job["label"]
    begin, end = keys.u_range(mtx.user, "lidx", label)
    rows = tr.get_range(begin, end, limit=BATCH)
    done = 0
    pending: dict[str, set[str]] = {}  # threads touched: their stats are recomputed once
    for k, _ in rows:
        msg_id = str(keys.unpack(k)[-1])
        rec = tr.get(keys.u(mtx.user, "msg", msg_id))
        if rec is None:
            tr.clear(k)
            continue
        if job["kind"] == "empty":
            messages.delete(mtx, msg_id, pending)
        else:
            old = types_pb2.Message.FromString(rec)
            new = types_pb2.Message()
            new.CopyFrom(old)
            del new.label_ids[:]
            new.label_ids.extend(lb for lb in old.label_ids if lb != label)
            index.apply(mtx, old, new, types_pb2.CHANGE_TYPE_LABELS_CHANGED, pending)
        done += 1
    index.refresh_threads(mtx, pending)
    if len(rows) < BATCH:
        if job["kind"] == "delete_label":
            for sub in ("lctr", "uid", "lidx", "lunr", "lstr", "tidx", "tunr", "tstr"):
                b, e = keys.u_range(mtx.user, sub, label)
                tr.clear_range(b, e)
        tr.clear(keys.g("jobs", mtx.user, job_id))
        return True, done
    return False, done


def pending(tr: Transaction, limit: int = 1000) -> list[tuple[str, str]]:
    begin, end = keys.g_range("jobs")
    return [(str(keys.unpack(k)[-2]), str(keys.unpack(k)[-1])) for k, _ in tr.get_range(begin, end, limit=limit)]
