"""The EVENTS indexer: a durable JetStream pull consumer (DURABLE) that keeps the search
documents in step with the mailboxes.

Per mailbox change (MailboxEvent on mailbox.events.<user>):
- MESSAGE_ADDED: the message is read from the mailbox in FULL format and indexed;
- LABELS_CHANGED, FLAGS_CHANGED, THREAD_CHANGED: labels, unread, starred and thread are taken
  from the change (no mailbox call), applied only if the change is newer than the document;
- MESSAGE_DELETED: the document is removed (trashing is a label change: TRASH);
- account_deleted (no change): every document of the user is removed;
- label and delivery changes need nothing (labels are matched by id, names resolved per query).

Batching (streams.consume_batch): each fetch returns what is waiting (up to BATCH events); the
messages to read are fetched concurrently, the changes are applied in order to an in-memory
overlay, then written in ONE backend write (one tantivy commit), and only then acked. A
temporary failure (mailbox or backend unavailable) naks the event and everything after it in the
batch, with a delay; undecodable payloads are terminated. Redelivery is harmless: every write is
guarded by MODSEQ.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import nats
from mailmesh.v1 import events_pb2, types_pb2
from nats.js import JetStreamContext

from mailmesh_common import streams, telemetry
from mailmesh_common.errors import MailmeshError, Unavailable
from mailmesh_common.mailboxclient import MailboxClient
from svc_search.backends.base import Key
from svc_search.documents import SearchDocument, from_message
from svc_search.store import EVERYTHING, DocStore

log = logging.getLogger(__name__)

DURABLE = "svc-search-indexer"
BATCH = 512
FETCH_TIMEOUT_S = 1.0
ACK_WAIT_S = 120.0
NAK_DELAY_S = 2.0
FETCH_CONCURRENCY = 16
APPLIED_USERS = 100_000
POISON_ATTEMPTS = 10

CT = types_pb2
STATE_CHANGES = (CT.CHANGE_TYPE_LABELS_CHANGED, CT.CHANGE_TYPE_FLAGS_CHANGED, CT.CHANGE_TYPE_THREAD_CHANGED)
MESSAGE_CHANGES = (CT.CHANGE_TYPE_MESSAGE_ADDED, CT.CHANGE_TYPE_MESSAGE_DELETED, *STATE_CHANGES)

Delivery = streams.Delivery[events_pb2.MailboxEvent]


@dataclass
class _Event:
    d: Delivery
    change: types_pb2.Change

    @property
    def key(self) -> Key:
        return (self.change.user_id, self.change.message_id)


class Indexer:
    def __init__(self, store: DocStore, mailbox: MailboxClient, js: JetStreamContext, *,
                 durable: str = DURABLE, batch: int = BATCH) -> None:
        self.store = store
        self.mailbox = mailbox
        self.js = js
        self.durable = durable
        self.batch = batch
        self.indexed = 0  # events applied since start
        self.accounts_deleted = 0  # account deletions applied since start
        # highest MODSEQ indexed per user since start (bounded; for tests and operators)
        self.applied: OrderedDict[str, int] = OrderedDict()

    async def consumer_existed(self) -> bool:
        try:
            await self.js.consumer_info(streams.EVENTS.name, self.durable)
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def pending(self) -> int:
        """Events published but not yet acked by this consumer."""
        try:
            info = await self.js.consumer_info(streams.EVENTS.name, self.durable)
        except nats.js.errors.NotFoundError:
            return 0
        except Exception as exc:
            raise Unavailable(f"cannot read the indexer's position: {exc.__class__.__name__}") from exc
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    def options(self) -> streams.ConsumerOptions:
        return streams.ConsumerOptions(
            durable=self.durable, filter_subject=streams.EVENTS.subjects[0], batch=self.batch,
            ack_wait_s=ACK_WAIT_S, max_ack_pending=max(4 * self.batch, 1024), max_deliver=-1,
            nak_delay_s=NAK_DELAY_S, fetch_timeout_s=FETCH_TIMEOUT_S)

    async def run(self, stop: asyncio.Event) -> None:
        await streams.consume_batch(self.js, streams.EVENTS, events_pb2.MailboxEvent, self.process,
                                    self.options(), stop)

    # --- one batch
    async def process(self, batch: list[Delivery]) -> None:
        """Indexes a batch in order; marks each delivery ack, nak or term (consume_batch settles
        them). Segments of message changes are written together; an account deletion is applied
        on its own, after the changes before it."""
        for d in batch:
            d.nak(NAK_DELAY_S)  # until applied
        segment: list[_Event] = []
        for d in batch:
            ev = d.payload
            if ev.HasField("account_deleted"):
                if segment and not await self._index(segment):
                    return  # postponed: this event and the rest are nakked
                segment = []
                if not await self._delete_account(d, ev.account_deleted):
                    return
                continue
            change = ev.change
            if change.type in MESSAGE_CHANGES and (not change.user_id or not change.message_id):
                log.error("terminating event without user or message on %s", d.subject)
                d.term()
                continue
            segment.append(_Event(d, change))
        if segment:
            await self._index(segment)

    async def _delete_account(self, d: Delivery, gone: events_pb2.AccountDeleted) -> bool:
        """Removes every document of a deleted account; False if postponed (nakked)."""
        user = gone.user_id
        if not user or d.subject != streams.events_subject(user):
            log.error("terminating account-deleted event for %r on %s", user, d.subject)
            d.term()
            return True
        with d.span("events.index", {"messaging.consumer.group.name": self.durable,
                                     "mailmesh.account_deleted": True}) as span:
            try:
                async with self.store.lock:
                    removed = await self.store.backend.delete_stale(user, EVERYTHING, EVERYTHING)
                    self.store.note_account_deleted(user)
            except Unavailable as exc:
                log.warning("removing the documents of deleted user %s postponed: %s", user, exc.message)
                return False
            span.set_attribute("mailmesh.deleted", removed)
        log.info("user %s was deleted: %d search documents removed", user, removed)
        d.ack()
        self.accounts_deleted += 1
        self.applied.pop(user, None)
        return True

    async def _index(self, events: Sequence[_Event]) -> bool:
        """Indexes `events` in one write; True if all were settled (acked or terminated)."""
        fetched = await self._fetch_added(events)
        async with self.store.lock:
            try:
                done, upserts, deletes = await self._apply(events, fetched)
            except Unavailable as exc:
                log.warning("indexing batch postponed: %s", exc.message)
                return False
            try:
                with telemetry.tracer().start_as_current_span(
                        "search.index.commit", attributes={"mailmesh.documents": len(upserts),
                                                           "mailmesh.deleted": len(deletes)}):
                    await self.store.backend.write(upserts, deletes)
                failed: Exception | None = None
            except Exception as exc:
                failed = exc
            if failed is None:
                self.store.note_deleted(deletes)
        if isinstance(failed, Unavailable):
            log.warning("search index write failed: %s; events will be redelivered", failed.message)
            return False
        if failed is not None:
            if len(events) > 1:  # isolate the event the backend refuses: one write per event
                log.warning("search index write of %d events failed (%r); retrying one by one", len(events), failed)
                ok = True
                for ev in events:
                    ok = await self._index([ev]) and ok
                return ok
            self._refused(events[0], failed)
            return False
        for ev in events[:done]:
            ev.d.ack()
            self._applied(ev.change)
        self.indexed += done
        return done == len(events)

    def _refused(self, ev: _Event, exc: Exception) -> None:
        """One event the backend keeps refusing: retried, then terminated (logged) so that it
        does not hold the rest back forever."""
        attempts = ev.d.attempts
        if attempts >= POISON_ATTEMPTS:
            log.error("terminating change %s of user %s after %d failed attempts: %r",
                      ev.change.modseq, ev.change.user_id, attempts, exc)
            ev.d.term()
            return
        log.warning("search index refused change %s of user %s (%r); retrying later",
                    ev.change.modseq, ev.change.user_id, exc)

    def _applied(self, c: types_pb2.Change) -> None:
        if c.modseq > self.applied.get(c.user_id, 0):
            self.applied[c.user_id] = c.modseq
            self.applied.move_to_end(c.user_id)
            while len(self.applied) > APPLIED_USERS:
                self.applied.popitem(last=False)

    async def _fetch_added(self, events: Sequence[_Event]) -> dict[Key, types_pb2.Message | None | Exception]:
        """Reads the messages added in this batch from the mailbox, concurrently."""
        keys = list(dict.fromkeys(ev.key for ev in events if ev.change.type == CT.CHANGE_TYPE_MESSAGE_ADDED))
        sem = asyncio.Semaphore(FETCH_CONCURRENCY)
        out: dict[Key, types_pb2.Message | None | Exception] = {}

        async def one(key: Key) -> None:
            async with sem:
                try:
                    out[key] = await self.mailbox.find_message(*key, types_pb2.MESSAGE_FORMAT_FULL)
                except MailmeshError as exc:
                    out[key] = exc

        await asyncio.gather(*(one(k) for k in keys))
        return out

    async def _apply(self, events: Sequence[_Event], fetched: dict[Key, types_pb2.Message | None | Exception]
                     ) -> tuple[int, list[SearchDocument], list[Key]]:
        """Applies events in order to an overlay of the stored documents; returns how many
        events were applied (a temporary failure stops there) and the writes to make."""
        keys = list(dict.fromkeys(ev.key for ev in events if ev.change.type in MESSAGE_CHANGES))
        state: dict[Key, SearchDocument | None] = dict(await self.store.backend.get(keys))
        dirty: set[Key] = set()
        done = 0
        for ev in events:
            c = ev.change
            with ev.d.span("events.index", {"messaging.consumer.group.name": self.durable,
                                            "mailmesh.change": int(c.type)}):
                try:
                    await self._apply_one(ev, state, dirty, fetched)
                except Unavailable:
                    if done == 0:
                        raise
                    break
                except MailmeshError as exc:  # permanent for this event: logged, not retried forever
                    log.error("cannot index change %s of user %s: %s", c.modseq, c.user_id, exc.message)
            done += 1
        upserts = [d for k in dirty if (d := state.get(k)) is not None]
        deletes = [k for k in dirty if state.get(k) is None]
        return done, upserts, deletes

    async def _apply_one(self, ev: _Event, state: dict[Key, SearchDocument | None], dirty: set[Key],
                         fetched: dict[Key, types_pb2.Message | None | Exception]) -> None:
        c, key = ev.change, ev.key
        if c.type == CT.CHANGE_TYPE_MESSAGE_ADDED:
            got = fetched.get(key)
            if isinstance(got, Exception):
                raise got
            self._put_fetched(key, got, state, dirty)
        elif c.type in STATE_CHANGES:
            cur = state.get(key)
            if cur is None:
                # not indexed (an index rebuilt from an older point, or a lost add): read it
                self._put_fetched(key, await self.mailbox.find_message(*key, types_pb2.MESSAGE_FORMAT_FULL), state, dirty)
            elif c.modseq > cur.modseq:
                state[key] = cur.with_state(labels=list(c.label_ids), unread=c.unread, starred=c.starred,
                                            modseq=c.modseq, thread_id=c.thread_id)
                dirty.add(key)
        elif c.type == CT.CHANGE_TYPE_MESSAGE_DELETED:
            state[key] = None
            dirty.add(key)

    @staticmethod
    def _put_fetched(key: Key, m: types_pb2.Message | None, state: dict[Key, SearchDocument | None],
                     dirty: set[Key]) -> None:
        if m is None:
            return  # deleted since: its MESSAGE_DELETED event removes it (or already did)
        doc = from_message(key[0], m)
        cur = state.get(key)
        if cur is not None and cur.modseq > doc.modseq:
            return
        state[key] = replace(doc, generation=cur.generation) if cur is not None else doc
        dirty.add(key)
