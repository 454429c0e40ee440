"""Reading the changelog, the EVENTS relay (the outbox), and in-process change notification.

The relay publishes each user's committed changes to JetStream `EVENTS` on
`mailbox.events.<user>` with `Nats-Msg-Id` = `<user>:<modseq>`, then stores its position in the
KV store. A crash between publish and position update republishes; JetStream's duplicate window
drops the repeats, so consumers see each change once.
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

RELAY_BATCH = 256
DIRTY_SCAN = 128


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
        """Publishes pending changes of up to DIRTY_SCAN users; True if more may be pending."""
        begin, end = keys.g_range("dirty")
        rows = await self.db.run(lambda tr: tr.get_range(begin, end, limit=DIRTY_SCAN), readonly=True)
        more = False
        for k, _ in rows:
            user = str(keys.unpack(k)[-1])
            more |= await self.relay_user(user)
        more |= await self.relay_deleted_accounts()
        return more or len(rows) == DIRTY_SCAN

    async def relay_deleted_accounts(self) -> bool:
        """Publishes the account-deleted events that jobs.py left in the ("gone", user) outbox,
        clearing each once acked; True if more may be pending."""
        begin, end = keys.g_range("gone")
        rows = await self.db.run(lambda tr: tr.get_range(begin, end, limit=DIRTY_SCAN), readonly=True)
        for k, raw in rows:
            user = str(keys.unpack(k)[-1])
            event = events_pb2.MailboxEvent.FromString(raw)
            tp = event.account_deleted.traceparent
            await streams.publish(self.js, streams.events_subject(user), event, msg_id=f"{user}:deleted",
                                  headers={"traceparent": tp} if tp else {})
            await self.db.run(functools.partial(_clear_gone, user=user))
        return len(rows) == DIRTY_SCAN

    async def relay_user(self, user: str) -> bool:
        def read(tr: Transaction) -> tuple[int, list[tuple[int, bytes]]]:
            pos = decode_counter(tr.get(keys.g("relay", user)))
            _, e = keys.u_range(user, "log")
            rows = tr.get_range(keys.u(user, "log", pos + 1), e, limit=RELAY_BATCH)
            return pos, [(int(keys.unpack(k)[-1]), v) for k, v in rows]

        pos, rows = await self.db.run(read, readonly=True)
        if rows:
            subject = streams.events_subject(user)
            acks = [self._publish(subject, user, modseq, raw) for modseq, raw in rows]
            await asyncio.gather(*acks)
        last = rows[-1][0] if rows else pos

        def commit(tr: Transaction) -> bool:
            # never move the position back (another relay may have gone further meanwhile)
            done = max(last, decode_counter(tr.get(keys.g("relay", user))))
            tr.set(keys.g("relay", user), encode_counter(done))
            highest = decode_counter(tr.get(keys.u(user, "ctr", "modseq")))
            floor = decode_counter(tr.get(keys.u(user, "ctr", "logfloor")))
            # only published entries are trimmed; `retention` of them stay for ListChanges
            new_floor = done - self.retention
            trimmed = True
            if new_floor > floor:
                # bounded trim per pass; the user stays dirty until it is complete
                stop_at = min(new_floor, floor + RELAY_BATCH * 4)
                tr.clear_range(keys.u(user, "log", floor), keys.u(user, "log", stop_at))
                tr.set(keys.u(user, "ctr", "logfloor"), encode_counter(stop_at))
                trimmed = stop_at >= new_floor
            if highest <= done and trimmed:
                tr.clear(keys.g("dirty", user))
                return False
            return True

        return await self.db.run(commit)

    async def _publish(self, subject: str, user: str, modseq: int, raw: bytes) -> None:
        change = types_pb2.Change.FromString(raw)
        headers = {"traceparent": change.traceparent} if change.traceparent else {}
        await streams.publish(self.js, subject, events_pb2.MailboxEvent(change=change),
                              msg_id=f"{user}:{modseq}", headers=headers)
