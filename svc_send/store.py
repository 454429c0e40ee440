"""svc_send's own state: held sends, the outbound queue's bookkeeping and daily send counters,
in a KV store of the FoundationDB shape (embedded: `{data_dir}/send.db`; distributed: the
FoundationDB cluster, under the `send` subspace).

Key families (tuples under the subspace; values are protobuf from send_service.proto):
  ("send", send_id)                      StoredSend
  ("due", release_us, send_id)           "" - held or releasing sends by release time
  ("held", user, release_us, send_id)    "" - a user's held sends (ListScheduled)
  ("bymsg", user, message_id)            send_id
  ("idem", user, idempotency_key)        send_id
  ("sent", done_us, send_id)             "" - released or cancelled sends, purged after a week
  ("day", user, day_number)              atomic counter of messages sent that UTC day
  ("job", job_id)                        QueueEntry
  ("gen", job_id)                        atomic counter: the generation of the job's live message
  ("lease", job_id)                      "owner|until_us": an attempt in progress
  ("active", create_us, job_id)          "" - unfinished deliveries, oldest first
  ("finished", finish_us, job_id)        "" - finished deliveries, purged after a week
"""

from __future__ import annotations

import time
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from mailmesh_common.config import Settings
from mailmesh_common.errors import InvalidInput
from mailmesh_common.kv import Database, open_service_database, root_subspace
from mailmesh_common.pagetoken import INVALID, SignedTokens

SPACE = root_subspace()["send"]
RETENTION_S = 7 * 86400  # finished deliveries and released sends are kept this long


def key(*parts: Any) -> bytes:
    return SPACE.pack(tuple(parts))


def prefix_range(*parts: Any) -> tuple[bytes, bytes]:
    """[begin, end) of every key strictly below the tuple `parts`."""
    return SPACE.range(tuple(parts))


def unpack(k: bytes) -> tuple[Any, ...]:
    return SPACE.unpack(k)


def open_send_db(settings: Settings) -> Database:
    return open_service_database(settings, "send.db", "the send store")


def now_us() -> int:
    return time.time_ns() // 1000


def ts(us: int) -> Timestamp:
    t = Timestamp()
    t.seconds, micros = divmod(us, 1_000_000)
    t.nanos = micros * 1000
    return t


def us_of(t: Timestamp) -> int:
    return t.seconds * 1_000_000 + t.nanos // 1000


__all__ = ["RETENTION_S", "SPACE", "key", "now_us", "open_send_db", "prefix_range", "ts", "unpack", "us_of"]


class KeyPages:
    """Page tokens of listings over a KV key range, signed with the mesh secret
    (mailmesh_common.pagetoken): a listing continues after the last key it returned, only
    inside its own range and only for the user it was issued to."""

    def __init__(self, secret: str, purpose: str) -> None:
        self.tokens = SignedTokens(secret, purpose)

    def start(self, page_token: str, user: str, begin: bytes, end: bytes) -> bytes:
        """Where a page begins: `begin`, or just after the key the token names."""
        if not page_token:
            return begin
        try:
            after = bytes.fromhex(str(self.tokens.open(page_token, user, begin.hex())))
        except ValueError:
            raise InvalidInput(INVALID) from None
        if not begin <= after < end:
            raise InvalidInput(INVALID)
        return after + b"\x00"

    def next(self, user: str, begin: bytes, last: bytes) -> str:
        """The token continuing a listing of range `begin`.. after key `last`."""
        return self.tokens.seal(user, begin.hex(), last.hex())
