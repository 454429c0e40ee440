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

import fdb.tuple

from mailmesh_common.kv import Subspace

ROOT = Subspace(("mm",))
ALL = "ALL"  # the implicit "All Mail" label: every message not in SPAM or TRASH
_ROOT_KEY = ROOT.key
_INT_LIMIT = 1 << 63


def _pack(t: tuple[Any, ...]) -> bytes:
    """fdb.tuple.pack, with a fast path for the str and int elements every key here uses
    (byte-identical to the FoundationDB tuple layer; anything else goes to fdb.tuple)."""
    out = []
    for v in t:
        if type(v) is str:
            out.append(b"\x02" + v.encode().replace(b"\x00", b"\x00\xff") + b"\x00")
        elif type(v) is int and -_INT_LIMIT < v < _INT_LIMIT:
            if v == 0:
                out.append(b"\x14")
            elif v > 0:
                n = (v.bit_length() + 7) // 8
                out.append(bytes((0x14 + n,)) + v.to_bytes(n, "big"))
            else:
                n = ((-v).bit_length() + 7) // 8
                out.append(bytes((0x14 - n,)) + (v + (1 << (8 * n)) - 1).to_bytes(n, "big"))
        else:
            out.append(fdb.tuple.pack((v,)))
    return b"".join(out)


@functools.lru_cache(maxsize=4096)
def _user_prefix(user: str) -> bytes:
    return _ROOT_KEY + _pack(("u", user))


def g(*t: Any) -> bytes:
    return _ROOT_KEY + _pack(t)


def g_range(*t: Any) -> tuple[bytes, bytes]:
    p = g(*t)
    return p + b"\x00", p + b"\xff"


def u(user: str, *t: Any) -> bytes:
    return _user_prefix(user) + _pack(t)


def u_range(user: str, *t: Any) -> tuple[bytes, bytes]:
    p = u(user, *t)
    return p + b"\x00", p + b"\xff"


def _unpack(b: bytes) -> tuple[Any, ...] | None:
    """fdb.tuple.unpack for keys of str, bytes and int elements (byte strings of any length,
    ints of up to 8 bytes); None for anything else, which the caller leaves to fdb.tuple."""
    out: list[Any] = []
    pos, n = 0, len(b)
    while pos < n:
        code = b[pos]
        if code == 0x02 or code == 0x01:
            end = b.find(b"\x00", pos + 1)
            while 0 <= end < n - 1 and b[end + 1] == 0xFF:  # an escaped NUL inside the string
                end = b.find(b"\x00", end + 2)
            if end < 0:
                return None
            raw = b[pos + 1:end]
            if b"\x00\xff" in raw:
                raw = raw.replace(b"\x00\xff", b"\x00")
            out.append(raw.decode() if code == 0x02 else raw)
            pos = end + 1
        elif 0x0C <= code <= 0x1C:
            size = code - 0x14
            if size >= 0:
                out.append(int.from_bytes(b[pos + 1:pos + 1 + size], "big"))
            else:
                size = -size
                out.append(int.from_bytes(b[pos + 1:pos + 1 + size], "big") - (1 << (8 * size)) + 1)
            pos += 1 + size
            if pos > n:
                return None
        else:
            return None
    return tuple(out)


def unpack(key: bytes) -> tuple[Any, ...]:
    """The tuple of a key under ROOT (fast path for the str and int elements of our keys)."""
    if key.startswith(_ROOT_KEY):
        fast = _unpack(key[len(_ROOT_KEY):])
        if fast is not None:
            return fast
    return ROOT.unpack(key)
