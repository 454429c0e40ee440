"""Long operations as sequences of small transactions that resume after a crash: deleting a
label (removing it from every message) and emptying TRASH or SPAM. Each job is recorded in the
KV store first; every batch commits progress; `resume` finishes jobs a crash interrupted."""

from __future__ import annotations

import json

from mailmesh.v1 import types_pb2

from mailmesh_common.errors import InvalidInput, PermissionDenied
from mailmesh_common.kv import Transaction
from svc_mailbox import index, keys, labels, messages
from svc_mailbox.txn import MailTx

BATCH = 100


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


def step(mtx: MailTx, job_id: str) -> tuple[bool, int]:
    """Runs one bounded batch of a job; returns (finished, messages affected)."""
    tr = mtx.tr
    raw = tr.get(keys.g("jobs", mtx.user, job_id))
    if raw is None:
        return True, 0
    job = json.loads(raw)
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
