"""Reading the changelog, the EVENTS relay (the outbox), and in-process change notification.

The relay publishes each user's committed changes to JetStream `EVENTS` on
`mailbox.events.<user>` with `Nats-Msg-Id` = `<user>:<modseq>`, then stores its position in the
KV store. A crash between publish and position update republishes; JetStream's duplicate window
drops the repeats, so consumers see each change once. One relay pass costs two transactions
however many users it serves: one read of every pending change, one write of every position.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict

from mailmesh.v1 import events_pb2, types_pb2
from nats.js import JetStreamContext

from mailmesh_common import streams
from mailmesh_common.errors import FailedPrecondition, MailmeshError
from mailmesh_common.kv import Database, Transaction, decode_counter, encode_counter
from svc_mailbox import keys

log = logging.getLogger(__name__)

RELAY_BATCH = 256  # changes of one user per pass
DIRTY_SCAN = 128  # users per pass
RELAY_PASS_CHANGES = 1024  # changes per pass, all users together


def list_changes(tr: Transaction, *, user: str, since: int, limit: int) -> tuple[list[types_pb2.Change], int, bool]:
    highest = decode_counter(tr.get(keys.u(user, "ctr", "modseq")))
    floor = decode_counter(tr.get(keys.u(user, "ctr", "logfloor")))
    # entries below `floor` were trimmed: a reader needs since+1 onwards
    if since + 1 < floor:
        raise FailedPrecondition(
            f"changes since modseq {since} are no longer kept (the changelog starts at modseq {floor}); "
            "resynchronize from a full listing")
    begin = keys.u(user, "log", since + 1)
    _, end = keys.u_range(user, "log")
    rows = tr.get_range(begin, end, limit=limit + 1)
    changes = [types_pb2.Change.FromString(v) for _, v in rows[:limit]]
    return changes, highest, len(rows) > limit


def _clear_gone(tr: Transaction, user: str) -> None:
    """Clears a published account-deleted event, and the relay's keys of that user in case a
    relay pass that was running during the deletion wrote them back."""
    for family in ("gone", "relay", "dirty"):
        tr.clear(keys.g(family, user))


class ChangeHub:
    """Wakes in-process watchers (WatchChanges) and the relay after a commit."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)
        self.relay_wake = asyncio.Event()

    def notify(self, user: str) -> None:
        for ev in self._events.get(user, ()):
            ev.set()
        self.relay_wake.set()

    def subscribe(self, user: str) -> asyncio.Event:
        ev = asyncio.Event()
        self._events[user].add(ev)
        return ev

    def unsubscribe(self, user: str, ev: asyncio.Event) -> None:
        group = self._events.get(user)
        if group is not None:
            group.discard(ev)
            if not group:
                del self._events[user]


class EventsRelay:
    def __init__(self, db: Database, js: JetStreamContext, hub: ChangeHub, retention: int) -> None:
        self.db = db
        self.js = js
        self.hub = hub
        self.retention = retention

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.hub.relay_wake.clear()
            try:
                busy = await self.relay_once()
            except MailmeshError as exc:
                log.warning("events relay: %s; retrying", exc.message)
                await asyncio.sleep(1.0)
                continue
            except Exception:  # the relay must outlive any one failure; the changelog keeps the work
                log.exception("events relay failed; retrying")
                await asyncio.sleep(1.0)
                continue
            if not busy:
                try:
                    await asyncio.wait_for(self.hub.relay_wake.wait(), 0.5)
                except TimeoutError:
                    pass

    async def relay_once(self) -> bool:
        """One pass: publishes the pending changes of up to DIRTY_SCAN users (at most
        RELAY_PASS_CHANGES of them) and the pending account-deleted events; True if more may be
        pending. The pending work is read in one transaction and every user's new position is
        stored in one more, whatever the number of users."""
        begin, end = keys.g_range("dirty")
        gone_begin, gone_end = keys.g_range("gone")

        def read(tr: Transaction) -> tuple[bool, list[tuple[str, int, list[tuple[int, bytes]]]],
                                           list[tuple[bytes, bytes]]]:
            dirty = tr.get_range(begin, end, limit=DIRTY_SCAN)
            budget = RELAY_PASS_CHANGES
            work: list[tuple[str, int, list[tuple[int, bytes]]]] = []
            for k, _ in dirty:
                if budget <= 0:
                    break
                user = str(keys.unpack(k)[-1])
                pos = decode_counter(tr.get(keys.g("relay", user)))
                _, e = keys.u_range(user, "log")
                rows = tr.get_range(keys.u(user, "log", pos + 1), e, limit=min(RELAY_BATCH, budget))
                budget -= len(rows)
                work.append((user, pos, [(int(keys.unpack(k2)[-1]), v) for k2, v in rows]))
            more = len(dirty) == DIRTY_SCAN or len(work) < len(dirty)
            return more, work, tr.get_range(gone_begin, gone_end, limit=DIRTY_SCAN)

        more, work, gone = await self.db.run(read, readonly=True)
        if work:
            results = await asyncio.gather(*(self._publish_user(user, rows) for user, _, rows in work),
                                           return_exceptions=True)
            # positions of the users whose changes were all acknowledged; the others are
            # published again next pass (JetStream drops the repeats by Nats-Msg-Id)
            done = {user: rows[-1][0] if rows else pos
                    for (user, pos, rows), res in zip(work, results, strict=True) if res is None}
            if done:
                more |= await self.db.run(functools.partial(self._commit, done=done))
            for res in results:
                if isinstance(res, BaseException):
                    raise res
        if gone:
            more |= await self.relay_deleted_accounts(gone)
        return more

    async def relay_deleted_accounts(self, rows: list[tuple[bytes, bytes]]) -> bool:
        """Publishes the account-deleted events that jobs.py left in the ("gone", user) outbox
        (`rows`, read by relay_once), clearing each once acked; True if more may be pending."""
        for k, raw in rows:
            user = str(keys.unpack(k)[-1])
            event = events_pb2.MailboxEvent.FromString(raw)
            tp = event.account_deleted.traceparent
            await streams.publish(self.js, streams.events_subject(user), event, msg_id=f"{user}:deleted",
                                  headers={"traceparent": tp} if tp else {})
            await self.db.run(functools.partial(_clear_gone, user=user))
        return len(rows) == DIRTY_SCAN

    async def _publish_user(self, user: str, rows: list[tuple[int, bytes]]) -> None:
        """Publishes one user's changes in modseq order; returns once every one is acked."""
        if rows:
            subject = streams.events_subject(user)
            await asyncio.gather(*(self._publish(subject, user, modseq, raw) for modseq, raw in rows))

    def _commit(self, tr: Transaction, *, done: dict[str, int]) -> bool:
        """Stores each user's relay position and trims its published changelog; True if a user
        still has work (changes committed meanwhile, or trimming left)."""
        more = False
        for user, last in done.items():
            # never move the position back (another relay may have gone further meanwhile)
            position = max(last, decode_counter(tr.get(keys.g("relay", user))))
            tr.set(keys.g("relay", user), encode_counter(position))
            highest = decode_counter(tr.get(keys.u(user, "ctr", "modseq")))
            floor = decode_counter(tr.get(keys.u(user, "ctr", "logfloor")))
            # only published entries are trimmed; `retention` of them stay for ListChanges
            new_floor = position - self.retention
            trimmed = True
            if new_floor > floor:
                # bounded trim per pass; the user stays dirty until it is complete
                stop_at = min(new_floor, floor + RELAY_BATCH * 4)
                tr.clear_range(keys.u(user, "log", floor), keys.u(user, "log", stop_at))
                tr.set(keys.u(user, "ctr", "logfloor"), encode_counter(stop_at))
                trimmed = stop_at >= new_floor
            if highest <= position and trimmed:
                tr.clear(keys.g("dirty", user))
            else:
                more = True
        return more

    async def _publish(self, subject: str, user: str, modseq: int, raw: bytes) -> None:
        change = types_pb2.Change.FromString(raw)
        headers = {"traceparent": change.traceparent} if change.traceparent else {}
        await streams.publish(self.js, subject, events_pb2.MailboxEvent(change=change),
                              msg_id=f"{user}:{modseq}", headers=headers)
