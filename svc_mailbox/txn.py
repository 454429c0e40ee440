"""The per-transaction context of mailbox writes: the user, MODSEQ assignment and the changelog.

Every change to a mailbox goes through `MailTx.change()`, which assigns the next MODSEQ and
writes the Change to the user's changelog in the same transaction (DESIGN.md: no "commit, then
publish" dual write), and marks the user dirty for the EVENTS relay.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import types_pb2

from mailmesh_common import telemetry
from mailmesh_common.kv import Transaction, decode_counter, encode_counter
from svc_mailbox import keys


def now_us() -> int:
    return time.time_ns() // 1000


def ts_from_us(us: int) -> Timestamp:
    t = Timestamp()
    t.FromMicroseconds(us)
    return t


@dataclass
class MailTx:
    tr: Transaction
    user: str
    now: int = field(default_factory=now_us)
    _modseq: int | None = None
    changes: list[types_pb2.Change] = field(default_factory=list)
    traceparent: str = field(default_factory=lambda: telemetry.inject_headers().get("traceparent", ""))
    # thread id -> its newest member, when the last change to the thread's stats made that
    # known (index.py), so the summary's refresh need not look it up
    newest: dict[str, types_pb2.Message] = field(default_factory=dict)

    def current_modseq(self) -> int:
        if self._modseq is None:
            self._modseq = decode_counter(self.tr.get(keys.u(self.user, "ctr", "modseq")))
        return self._modseq

    def next_modseq(self) -> int:
        value = self.current_modseq() + 1
        self._modseq = value
        self.tr.set(keys.u(self.user, "ctr", "modseq"), encode_counter(value))
        return value

    def change(self, type_: types_pb2.ChangeType.ValueType, *, message: types_pb2.Message | None = None,
               added: Iterable[str] = (), removed: Iterable[str] = (), label_id: str = "",
               uids: dict[str, int] | None = None) -> types_pb2.Change:
        modseq = self.next_modseq()
        ch = types_pb2.Change(modseq=modseq, type=type_, user_id=self.user, label_id=label_id,
                              time=ts_from_us(self.now), added_label_ids=sorted(added),
                              removed_label_ids=sorted(removed), traceparent=self.traceparent)
        if message is not None:
            message.history_id = modseq
            ch.message_id = message.id
            ch.thread_id = message.thread_id
            ch.label_ids.extend(message.label_ids)
            ch.unread = message.unread
            ch.starred = message.starred
            ch.keywords.extend(message.keywords)
            for k, v in (uids if uids is not None else dict(message.uids)).items():
                ch.uids[k] = v
        self.tr.set(keys.u(self.user, "log", modseq), ch.SerializeToString())
        if not self.changes:  # once per transaction: the relay reads the whole log from its position
            self.tr.set(keys.g("dirty", self.user), b"")
        self.changes.append(ch)
        return ch

    def counter(self, *key: object) -> int:
        return decode_counter(self.tr.get(keys.u(self.user, *key)))

    def add(self, delta: int, *key: object) -> None:
        if delta:
            self.tr.add(keys.u(self.user, *key), delta)
