"""Key layout of the mailbox store (DESIGN.md "State"). Every per-user key starts with
("u", user_id) so FoundationDB shards by user; values are serialized protobuf or counters.

global
  ("dom", domain)                         Domain
  ("domctr", domain)                      counter                  (accounts in the domain)
  ("addr", address)                       user_id                  (every address → account)
  ("acct", primary_address)               user_id                  (ListAccounts order)
  ("acctdom", domain, primary_address)    user_id                  (ListAccounts in a domain)
  ("dirty", user_id)                      b""                      (changelog not yet relayed)
  ("relay", user_id)                      counter                  (last modseq published to EVENTS)
  ("gone", user_id)                       MailboxEvent             (account deleted; the relay publishes
                                                                    it to EVENTS, then clears it)
  ("blob", sha256)                        counter                  (references to a blob)
  ("blobgc", ts, sha256)                  b""                      (unreferenced since ts: collect
  ("blobgcref", sha256)                   ts                        after the grace period)
  ("jobs", user_id, job_id)               JSON job                 (resumable bounded operation;
                                                                    global so a restart finds them)
per user ("u", user_id, ...)
  ("acct",)                               Account
  ("pw",)                                 password hash (scrypt; never the password)
  ("ctr", name)                           counters: modseq, used, total, labelseq, userlabels, logfloor
  ("lbl", label_id)                       Label (counts live in lctr)
  ("lname", casefolded name)              label_id
  ("lctr", label_id, name)                counters: total, unread, starred, threads, tunread, tstarred
                                          (threads with an unread / starred message), uidnext, hms
  ("msg", message_id)                     Message (metadata; bodies stay in the blob)
  ("lidx", label_id, ts, message_id)      b""   newest-first list index (read in reverse)
  ("lunr", label_id, ts, message_id)      b""   unread index
  ("lstr", label_id, ts, message_id)      b""   starred index
  ("uid", label_id, uid)                  message_id
  ("thr", thread_id)                      Thread (summary: subject, count, participants)
  ("tredir", thread_id)                   thread_id it was merged into
  ("tmem", thread_id, ts, message_id)     b""
  ("tlm", thread_id, label_id, ts, msg)   b""   thread members per label ("*": every member)
  ("tl", thread_id, label_id)             ThreadLabel stats (count, unread, starred, last ts);
                                          label "*" covers every member (the summary's stats)
  ("tidx", label_id, ts, thread_id)       b""   thread list index; also tunr / tstr
  ("mid", message_id_header)              thread_id (also for ids only referenced so far)
  ("subj", normalized subject, thread_id) newest/oldest ts and participants (subject fallback)
  ("log", modseq)                         Change
  ("dlv", ingest_id)                      message_id (delivery dedup)
  ("idem", key)                           message_id (append idempotency)
  ("deleting",)                           b""   the account is being deleted (jobs.py)
"""

from __future__ import annotations

import functools
from typing import Any

from mailmesh_common.kv import Subspace
from mailmesh_common.kv.subspace import pack_tuple

ROOT = Subspace(("mm",))
ALL = "ALL"  # the implicit "All Mail" label: every message not in SPAM or TRASH
_ROOT_KEY = ROOT.key


@functools.lru_cache(maxsize=4096)
def _user_prefix(user: str) -> bytes:
    return _ROOT_KEY + pack_tuple(("u", user))


def g(*t: Any) -> bytes:
    return _ROOT_KEY + pack_tuple(t)


def g_range(*t: Any) -> tuple[bytes, bytes]:
    p = g(*t)
    return p + b"\x00", p + b"\xff"


def u(user: str, *t: Any) -> bytes:
    return _user_prefix(user) + pack_tuple(t)


def u_range(user: str, *t: Any) -> tuple[bytes, bytes]:
    p = u(user, *t)
    return p + b"\x00", p + b"\xff"


def unpack(key: bytes) -> tuple[Any, ...]:
    return ROOT.unpack(key)
