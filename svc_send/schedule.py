"""Held sends: the undo window and scheduled send, kept durably in the send store until their
release time, so that they survive a restart of every process.

A send is held (QUEUED for the undo window, SCHEDULED for a later time) until its release;
the release first marks it SENT and creates its queue entries in one transaction, then
publishes (INBOUND for local recipients, OUTBOUND per remote domain; both deduplicated by id),
then removes it from the due index. A crash in between leaves it in the due index, marked SENT,
and the next pass publishes again: JetStream drops the duplicates, delivery is idempotent.
CancelSend succeeds only while the send is still held.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import types_pb2

from mailmesh_common.errors import FailedPrecondition, NotFound
from mailmesh_common.kv import Database, Transaction, decode_counter
from svc_send import store
from svc_send.queue import QueueStore
from svc_send.store import key, ts, us_of

HELD = (spb.SEND_STATUS_QUEUED, spb.SEND_STATUS_SCHEDULED)


def day_number(us: int) -> int:
    """The UTC day of a time (days since the epoch)."""
    return us // 86_400_000_000


def _load(tr: Transaction, send_id: str) -> spb.StoredSend | None:
    raw = tr.get(key("send", send_id))
    return spb.StoredSend.FromString(raw) if raw is not None else None


@dataclass(frozen=True)
class Due:
    release_us: int
    send_id: str


class HeldSends:
    def __init__(self, db: Database, queue_max_age_s: float, *, secret: str) -> None:
        self.pages = store.KeyPages(secret, "send-held")
        self.db = db
        self.max_age_us = int(queue_max_age_s * 1e6)

    # --- accepting ------------------------------------------------------------------------------
    async def find_idempotent(self, user: str, idempotency_key: str) -> spb.StoredSend | None:
        def fn(tr: Transaction) -> spb.StoredSend | None:
            sid = tr.get(key("idem", user, idempotency_key))
            return _load(tr, sid.decode()) if sid is not None else None

        return await self.db.run(fn, readonly=True)

    async def sent_today(self, user: str, now: int) -> int:
        return await self.db.run(lambda tr: decode_counter(tr.get(key("day", user, day_number(now)))),
                                 readonly=True)

    async def hold(self, rec: spb.StoredSend, idempotency_key: str, now: int, *,
                   release_now: bool = False) -> spb.StoredSend:
        """Stores a new held send (counting it for the day); returns the stored one, which is an
        earlier send when the idempotency key raced with another request. With release_now (no
        undo window, no schedule) the same transaction also claims its release (claim_release),
        one commit less per message; the send stays in the due index until finish_release."""
        user = rec.sender_user_id
        release = us_of(rec.send.send_time)
        send_id = rec.send.send_id

        def fn(tr: Transaction) -> spb.StoredSend:
            if idempotency_key:
                prior = tr.get(key("idem", user, idempotency_key))
                if prior is not None:
                    found = _load(tr, prior.decode())
                    if found is not None:
                        return found
                tr.set(key("idem", user, idempotency_key), send_id.encode())
            prior_for_msg = tr.get(key("bymsg", user, rec.message_id))
            if prior_for_msg is not None:  # the SENT append was idempotent: the same message
                found = _load(tr, prior_for_msg.decode())
                if found is not None:
                    return found
            tr.set(key("send", send_id), rec.SerializeToString())
            tr.set(key("due", release, send_id), b"")
            tr.set(key("held", user, release, send_id), b"")
            tr.set(key("bymsg", user, rec.message_id), send_id.encode())
            today = day_number(now)
            tr.clear_range(key("day", user, 0), key("day", user, today))  # earlier days are done
            tr.add(key("day", user, today), 1)
            if release_now:
                return self._claim_in(tr, rec, now)
            return rec

        return await self.db.run(fn)

    # --- releasing ------------------------------------------------------------------------------
    async def due(self, now: int, limit: int = 100) -> list[Due]:
        """Held or half-released sends whose time has come, soonest first."""
        def fn(tr: Transaction) -> list[Due]:
            begin, _ = store.prefix_range("due")
            rows = tr.get_range(begin, key("due", now + 1), limit=limit)
            return [Due(int(t[1]), str(t[2])) for t in (store.unpack(k) for k, _ in rows)]

        return await self.db.run(fn, readonly=True)

    async def next_release(self) -> int | None:
        def fn(tr: Transaction) -> int | None:
            rows = tr.get_range(*store.prefix_range("due"), limit=1)
            return int(store.unpack(rows[0][0])[1]) if rows else None

        return await self.db.run(fn, readonly=True)

    async def claim_release(self, send_id: str, now: int) -> spb.StoredSend | None:
        """Marks a held send SENT and creates its queue entries; None when it is not to be
        released (cancelled, or gone). A send already marked SENT is returned again."""
        def fn(tr: Transaction) -> spb.StoredSend | None:
            rec = _load(tr, send_id)
            if rec is None or rec.send.status == spb.SEND_STATUS_CANCELLED:
                return None
            if rec.send.status == spb.SEND_STATUS_SENT:
                return rec
            return self._claim_in(tr, rec, now)

        return await self.db.run(fn)

    def _claim_in(self, tr: Transaction, held: spb.StoredSend, now: int) -> spb.StoredSend:
        """claim_release's writes for a held send (a copy of `held` is returned, marked SENT)."""
        rec = spb.StoredSend()
        rec.CopyFrom(held)  # the caller's copy stays as it was (a transaction may run again)
        send_id = rec.send.send_id
        release = us_of(rec.send.send_time)
        rec.send.status = spb.SEND_STATUS_SENT
        tr.clear(key("held", rec.sender_user_id, release, send_id))
        if rec.HasField("inbound"):
            rec.inbound.received_time.CopyFrom(ts(now))
        for job in rec.outbound:
            job.create_time.CopyFrom(ts(now))
            job.not_before.CopyFrom(ts(release))
            entry = spb.QueueEntry(
                name=f"queueEntries/{job.job_id}", id=job.job_id, sender_user_id=rec.sender_user_id,
                message=rec.send.name, mail_from=job.mail_from, domain=job.domain,
                state=spb.QUEUE_ENTRY_STATE_QUEUED, subject=rec.send.subject, blob_ref=job.blob_ref,
                size=rec.size, status_synced=True, send_id=send_id)
            entry.recipients.extend(types_pb2.RecipientStatus(
                email=r, state=types_pb2.RECIPIENT_STATE_QUEUED, updated_time=ts(now)) for r in job.rcpt_to)
            entry.create_time.CopyFrom(ts(now))
            entry.next_attempt_time.CopyFrom(ts(max(now, release)))
            entry.expire_time.CopyFrom(ts(now + self.max_age_us))
            QueueStore.create_in(tr, entry)
        tr.set(key("send", send_id), rec.SerializeToString())
        return rec

    async def finish_release(self, due: Due, now: int) -> None:
        """Takes a released (or vanished) send out of the due index."""
        def fn(tr: Transaction) -> None:
            tr.clear(key("due", due.release_us, due.send_id))
            if tr.get(key("send", due.send_id)) is not None:
                tr.set(key("sent", now, due.send_id), b"")

        await self.db.run(fn)

    # --- cancelling and listing -----------------------------------------------------------------
    async def cancel(self, user: str, message_id: str, now: int) -> spb.StoredSend:
        """CancelSend's transaction: a held send becomes CANCELLED (repeating it is harmless)."""
        def fn(tr: Transaction) -> spb.StoredSend:
            sid = tr.get(key("bymsg", user, message_id))
            rec = _load(tr, sid.decode()) if sid is not None else None
            if rec is None:
                raise NotFound(f"no send of message {message_id!r} is known")
            if rec.send.status == spb.SEND_STATUS_CANCELLED:
                return rec
            if rec.send.status not in HELD:
                raise FailedPrecondition("the message is already being delivered; it can no longer be cancelled")
            release = us_of(rec.send.send_time)
            rec.send.status = spb.SEND_STATUS_CANCELLED
            tr.set(key("send", rec.send.send_id), rec.SerializeToString())
            tr.clear(key("due", release, rec.send.send_id))
            tr.clear(key("held", user, release, rec.send.send_id))
            tr.set(key("sent", now, rec.send.send_id), b"")
            return rec

        return await self.db.run(fn)

    async def list_held(self, user: str, page_size: int, page_token: str) -> tuple[list[spb.ScheduledSend], str]:
        n = 50 if page_size <= 0 else min(page_size, 500)
        first, end = store.prefix_range("held", user)
        begin = self.pages.start(page_token, user, first, end)

        def fn(tr: Transaction) -> tuple[list[spb.ScheduledSend], str]:
            rows = tr.get_range(begin, end, limit=n + 1)
            out = []
            for k, _ in rows[:n]:
                rec = _load(tr, str(store.unpack(k)[-1]))
                if rec is not None:
                    out.append(rec.send)
            token = self.pages.next(user, first, rows[n - 1][0]) if len(rows) > n else ""
            return out, token

        return await self.db.run(fn, readonly=True)

    async def get(self, send_id: str) -> spb.StoredSend | None:
        return await self.db.run(lambda tr: _load(tr, send_id), readonly=True)

    async def purge(self, before_us: int, limit: int = 500) -> int:
        """Forgets released and cancelled sends finished before `before_us` (their idempotency
        keys too: a retry after a week is a new message)."""
        def fn(tr: Transaction) -> int:
            begin, _ = store.prefix_range("sent")
            rows = tr.get_range(begin, key("sent", before_us), limit=limit)
            for k, _ in rows:
                send_id = str(store.unpack(k)[-1])
                tr.clear(k)
                rec = _load(tr, send_id)
                if rec is None:
                    continue
                tr.clear(key("send", send_id))
                tr.clear(key("bymsg", rec.sender_user_id, rec.message_id))
                if rec.idempotency_key:
                    tr.clear(key("idem", rec.sender_user_id, rec.idempotency_key))
            return len(rows)

        return await self.db.run(fn)


__all__ = ["HELD", "Due", "HeldSends", "day_number"]
