"""Key layout of the mailbox store (DESIGN.md "State"). Every per-user key starts with
("u", user_id) so FoundationDB shards by user; values are serialized protobuf or counters.

global
  ("dom", domain)                         Domain
  ("addr", address)                       user_id                  (every address → account)
  ("acct", primary_address)               user_id                  (ListAccounts order)
  ("dirty", user_id)                      b""                      (changelog not yet relayed)
  ("relay", user_id)                      counter                  (last modseq published to EVENTS)
  ("blob", sha256)                        counter                  (references to a blob)
per user ("u", user_id, ...)
  ("acct",)                               Account
  ("pw",)                                 password hash
  ("ctr", name)                           counters: modseq, used, total, labelseq
  ("lbl", label_id)                       Label (counts live in lctr)
  ("lname", casefolded name)              label_id
  ("lctr", label_id, name)                counters: total, unread, uidnext, hms, threads
  ("msg", message_id)                     Message (metadata; bodies stay in the blob)
  ("lidx", label_id, ts, message_id)      b""   newest-first list index (read in reverse)
  ("lunr", label_id, ts, message_id)      b""   unread index
  ("lstr", label_id, ts, message_id)      b""   starred index
  ("uid", label_id, uid)                  message_id
  ("thr", thread_id)                      Thread (summary: subject, count, participants)
  ("tmem", thread_id, ts, message_id)     b""
  ("tl", thread_id, label_id)             ThreadLabel stats (count, unread, starred, last ts)
  ("tidx", label_id, ts, thread_id)       b""   thread list index; also tunr / tstr
  ("mid", message_id_header)              thread_id (also for ids only referenced so far)
  ("subj", normalized subject, thread_id) ts of the newest message (subject fallback)
  ("log", modseq)                         Change
  ("dlv", ingest_id)                      message_id (delivery dedup)
  ("idem", key)                           message_id (append idempotency)
  ("job", job_id)                         Job (resumable bounded operation)
"""

from __future__ import annotations

from typing import Any

from mailmesh_common.kv import Subspace

ROOT = Subspace(("mm",))
ALL = "ALL"  # the implicit "All Mail" label: every message not in SPAM or TRASH


def g(*t: Any) -> bytes:
    return ROOT.pack(t)


def g_range(*t: Any) -> tuple[bytes, bytes]:
    return ROOT.range(t)


def u(user: str, *t: Any) -> bytes:
    return ROOT.pack(("u", user, *t))


def u_range(user: str, *t: Any) -> tuple[bytes, bytes]:
    return ROOT.range(("u", user, *t))


def unpack(key: bytes) -> tuple[Any, ...]:
    return ROOT.unpack(key)
