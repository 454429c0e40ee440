"""The EVENTS indexer: a durable JetStream pull consumer (DURABLE) that keeps the search
documents in step with the mailboxes.

Per mailbox change (MailboxEvent on mailbox.events.<user>):
- MESSAGE_ADDED: the message is read from the mailbox in FULL format and indexed;
- LABELS_CHANGED, FLAGS_CHANGED, THREAD_CHANGED: labels, unread, starred and thread are taken
  from the change (no mailbox call), applied only if the change is newer than the document;
- MESSAGE_DELETED: the document is removed (trashing is a label change: TRASH);
- label and delivery changes need nothing (labels are matched by id, names resolved per query).

Batching: each fetch returns what is waiting (up to BATCH events); the messages to read are
fetched concurrently, the changes are applied in order to an in-memory overlay, then written
in ONE backend write (one tantivy commit), and only then acked. A temporary failure (mailbox
or backend unavailable) naks the event and everything after it in the batch, with a delay;
undecodable payloads are terminated. Redelivery is harmless: every write is guarded by MODSEQ.

This consumer does not use streams.consume, which acks each message after its own handler:
acking only after a shared commit needs the whole batch in hand.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import nats
from google.protobuf.message import DecodeError
from mailmesh.v1 import events_pb2, types_pb2
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from mailmesh_common import streams, telemetry
from mailmesh_common.errors import MailmeshError, Unavailable
from svc_search.backends.base import Key
from svc_search.documents import SearchDocument, from_message
from svc_search.mailbox import MailboxClient
from svc_search.store import DocStore

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


@dataclass
class _Event:
    raw: Msg
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

    async def subscribe(self) -> JetStreamContext.PullSubscription:
        subject = streams.EVENTS.subjects[0]
        cfg = js_api.ConsumerConfig(durable_name=self.durable, ack_policy=js_api.AckPolicy.EXPLICIT,
                                    ack_wait=ACK_WAIT_S, max_ack_pending=max(4 * self.batch, 1024),
                                    max_deliver=-1, filter_subject=subject)
        return await self.js.pull_subscribe(subject, durable=self.durable, stream=streams.EVENTS.name, config=cfg)

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.subscribe()
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(self.batch, timeout=FETCH_TIMEOUT_S)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except Exception as exc:
                    if stop.is_set():
                        break
                    log.warning("fetch from EVENTS failed: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                try:
                    await self.process(msgs)
                except Exception:  # the indexer must outlive any one batch; its events come back
                    log.exception("indexing a batch of %d events failed; they will be redelivered", len(msgs))
                    await self._nak_raw(msgs)
                    await asyncio.sleep(NAK_DELAY_S)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    # --- one batch
    async def process(self, msgs: Sequence[Msg]) -> None:
        events: list[_Event] = []
        for raw in msgs:
            try:
                change = events_pb2.MailboxEvent.FromString(raw.data).change
            except DecodeError:
                log.error("terminating undecodable event on %s", raw.subject)
                await raw.term()
                continue
            if change.type in MESSAGE_CHANGES and (not change.user_id or not change.message_id):
                log.error("terminating event without user or message on %s", raw.subject)
                await raw.term()
                continue
            events.append(_Event(raw, change))
        if events:
            await self._index(events)

    async def _index(self, events: Sequence[_Event]) -> None:
        fetched = await self._fetch_added(events)
        async with self.store.lock:
            try:
                done, upserts, deletes = await self._apply(events, fetched)
            except Unavailable as exc:
                log.warning("indexing batch postponed: %s", exc.message)
                await self._nak(events)
                return
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
            await self._nak(events)
            return
        if failed is not None:
            if len(events) > 1:  # isolate the event the backend refuses: one write per event
                log.warning("search index write of %d events failed (%r); retrying one by one", len(events), failed)
                for ev in events:
                    await self._index([ev])
                return
            await self._refused(events[0], failed)
            return
        for ev in events[:done]:
            await ev.raw.ack()
            self._applied(ev.change)
        await self._nak(events[done:])
        self.indexed += done

    async def _refused(self, ev: _Event, exc: Exception) -> None:
        """One event the backend keeps refusing: retried, then terminated (logged) so that it
        does not hold the rest back forever."""
        try:
            attempts = int(ev.raw.metadata.num_delivered or 1)
        except Exception:
            attempts = 1
        if attempts >= POISON_ATTEMPTS:
            log.error("terminating change %s of user %s after %d failed attempts: %r",
                      ev.change.modseq, ev.change.user_id, attempts, exc)
            await ev.raw.term()
            return
        log.warning("search index refused change %s of user %s (%r); retrying later",
                    ev.change.modseq, ev.change.user_id, exc)
        await self._nak([ev])

    def _applied(self, c: types_pb2.Change) -> None:
        if c.modseq > self.applied.get(c.user_id, 0):
            self.applied[c.user_id] = c.modseq
            self.applied.move_to_end(c.user_id)
            while len(self.applied) > APPLIED_USERS:
                self.applied.popitem(last=False)

    async def _nak(self, events: Sequence[_Event]) -> None:
        for ev in events:
            try:
                await ev.raw.nak(delay=NAK_DELAY_S)
            except Exception:
                pass  # redelivered after ack_wait anyway

    @staticmethod
    async def _nak_raw(msgs: Sequence[Msg]) -> None:
        for raw in msgs:
            try:
                await raw.nak(delay=NAK_DELAY_S)
            except Exception:
                pass

    async def _fetch_added(self, events: Sequence[_Event]) -> dict[Key, types_pb2.Message | None | Exception]:
        """Reads the messages added in this batch from the mailbox, concurrently."""
        keys = list(dict.fromkeys(ev.key for ev in events if ev.change.type == CT.CHANGE_TYPE_MESSAGE_ADDED))
        sem = asyncio.Semaphore(FETCH_CONCURRENCY)
        out: dict[Key, types_pb2.Message | None | Exception] = {}

        async def one(key: Key) -> None:
            async with sem:
                try:
                    out[key] = await self.mailbox.get_message(*key)
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
            headers = ev.raw.headers or {}
            with telemetry.consumer_span("events.index", headers, {
                    "messaging.system": "nats", "messaging.destination.name": ev.raw.subject,
                    "messaging.consumer.group.name": self.durable, "mailmesh.change": int(c.type)}):
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
                self._put_fetched(key, await self.mailbox.get_message(*key), state, dirty)
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
