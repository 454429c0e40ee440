"""The outbound queue's bookkeeping: one QueueEntry per delivery job (a message to the
recipients of one remote domain), next to the job's message in JetStream OUTBOUND.

JetStream holds the work (a job's message is redelivered with nak-with-delay until the job is
finished); this store holds what an operator asks about and what makes delivery exactly-once
per recipient: each recipient's state, attempts, last reply, the next attempt time, and a lease
so that two messages of one job never attempt at once.

A job's message carries a generation (header `Mailmesh-Job-Gen`; 0 for the first). Retrying a
job now publishes a message of the next generation; a message older than the job's generation
is dropped when it comes back, so each job has one live message in the end.

Transitions of a recipient: QUEUED -> DEFERRED* -> DELIVERED | BOUNCED. A job is finished when
no recipient is QUEUED or DEFERRED; it bounces the still-deferred recipients when it is still
failing at its expire time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import types_pb2

from mailmesh_common.errors import ConfigError, FailedPrecondition, InvalidInput, NotFound
from mailmesh_common.kv import Database, Transaction, decode_counter
from svc_send import store
from svc_send.store import key, ts, us_of

GEN_HEADER = "Mailmesh-Job-Gen"
PENDING = (types_pb2.RECIPIENT_STATE_QUEUED, types_pb2.RECIPIENT_STATE_DEFERRED)
ACTIVE_STATES = (spb.QUEUE_ENTRY_STATE_QUEUED, spb.QUEUE_ENTRY_STATE_DEFERRED)


def parse_schedule(values: tuple[str, ...]) -> tuple[float, ...]:
    """The retry delays (seconds) of the outbound_retry_schedule_s setting."""
    try:
        out = tuple(float(v) for v in values)
    except ValueError:
        raise ConfigError(f"outbound_retry_schedule_s: expected numbers of seconds, got {','.join(values)!r}") from None
    if not out or any(v < 0 for v in out):
        raise ConfigError("outbound_retry_schedule_s: expected one or more non-negative numbers")
    return out


def entry_name(job_id: str) -> str:
    return f"queueEntries/{job_id}"


def job_of(name: str) -> str:
    prefix = "queueEntries/"
    job_id = name[len(prefix):] if name.startswith(prefix) else ""
    if not job_id or "/" in job_id or len(job_id) > 200:
        raise InvalidInput(f"name must look like queueEntries/{{id}}, got {name!r}")
    return job_id


@dataclass(frozen=True)
class RcptResult:
    """The outcome of one attempt for one recipient."""

    email: str
    outcome: str  # "delivered" | "deferred" | "bounced"
    reply: str


@dataclass
class Claim:
    """What a worker holding a job's message should do."""

    kind: str  # "drop" (ack), "wait" (nak with delay), "sync" (record states, then claim again), "attempt"
    entry: spb.QueueEntry | None = None
    delay_s: float = 0.0


@dataclass
class Recorded:
    """The entry after an attempt was recorded."""

    entry: spb.QueueEntry
    finished: bool
    delete_blob: bool = False
    newly_bounced: list[str] = field(default_factory=list)


def _load(tr: Transaction, job_id: str) -> spb.QueueEntry | None:
    raw = tr.get(key("job", job_id))
    return spb.QueueEntry.FromString(raw) if raw is not None else None


def _lease(tr: Transaction, job_id: str) -> tuple[str, int]:
    raw = tr.get(key("lease", job_id))
    if not raw:
        return "", 0
    owner, _, until = raw.decode().partition("|")
    return owner, int(until or 0)


def _finish(tr: Transaction, entry: spb.QueueEntry, now: int) -> bool:
    """Moves a finished entry from the active to the finished index; True when its send's
    signed blob may be removed (the send's last job, no local recipient sharing the blob)."""
    tr.clear(key("active", us_of(entry.create_time), entry.id))
    tr.set(key("finished", now, entry.id), b"")
    entry.finish_time.CopyFrom(ts(now))
    tr.clear(key("lease", entry.id))
    raw = tr.get(key("send", entry.send_id)) if entry.send_id else None
    if raw is None:
        return False
    rec = spb.StoredSend.FromString(raw)
    rec.open_jobs = max(0, rec.open_jobs - 1)
    tr.set(key("send", entry.send_id), rec.SerializeToString())
    return rec.open_jobs == 0 and not rec.local_recipients


def _final_state(entry: spb.QueueEntry) -> spb.QueueEntryState.ValueType:
    if any(r.state == types_pb2.RECIPIENT_STATE_BOUNCED for r in entry.recipients):
        return spb.QUEUE_ENTRY_STATE_BOUNCED
    return spb.QUEUE_ENTRY_STATE_DELIVERED


class QueueStore:
    def __init__(self, db: Database, schedule_s: tuple[float, ...], max_age_s: float, *, secret: str) -> None:
        self.pages = store.KeyPages(secret, "send-queue")
        self.db = db
        self.schedule_s = schedule_s
        self.max_age_s = max_age_s

    def delay_after(self, failures: int) -> float:
        """Wait after the n-th consecutive temporary failure (n >= 1)."""
        return self.schedule_s[min(max(failures, 1), len(self.schedule_s)) - 1]

    # --- creating ---------------------------------------------------------------------------------
    @staticmethod
    def create_in(tr: Transaction, entry: spb.QueueEntry) -> None:
        """Adds a new entry (inside the caller's transaction); an existing one is left alone."""
        if tr.get(key("job", entry.id)) is not None:
            return
        tr.set(key("job", entry.id), entry.SerializeToString())
        tr.set(key("active", us_of(entry.create_time), entry.id), b"")

    # --- the worker's side ------------------------------------------------------------------------
    async def claim(self, job_id: str, gen: int, owner: str, now: int, lease_s: float,
                    not_before_us: int = 0) -> Claim:
        def fn(tr: Transaction) -> Claim:
            entry = _load(tr, job_id)
            if entry is None:
                return Claim("drop")
            current = decode_counter(tr.get(key("gen", job_id)))
            if gen < current:
                return Claim("drop", entry)  # superseded by a newer message of the job
            if gen > current:
                tr.add(key("gen", job_id), gen - current)
            if not entry.status_synced:
                return Claim("sync", entry)
            if entry.state not in ACTIVE_STATES:
                return Claim("drop", entry)
            due = max(us_of(entry.next_attempt_time), not_before_us)
            if due > now:
                return Claim("wait", entry, (due - now) / 1e6)
            holder, until = _lease(tr, job_id)
            if holder and holder != owner and until > now:
                return Claim("wait", entry, (until - now) / 1e6 + 0.05)
            tr.set(key("lease", job_id), f"{owner}|{now + int(lease_s * 1e6)}".encode())
            return Claim("attempt", entry)

        return await self.db.run(fn)

    async def renew(self, job_id: str, owner: str, until_us: int) -> None:
        def fn(tr: Transaction) -> None:
            holder, _ = _lease(tr, job_id)
            if holder == owner:
                tr.set(key("lease", job_id), f"{owner}|{until_us}".encode())

        await self.db.run(fn)

    async def release(self, job_id: str, owner: str) -> None:
        def fn(tr: Transaction) -> None:
            holder, _ = _lease(tr, job_id)
            if holder == owner:
                tr.clear(key("lease", job_id))

        await self.db.run(fn)

    async def record(self, job_id: str, owner: str, results: list[RcptResult], now: int,
                     remote_mta: str = "") -> Recorded:
        """Records one attempt's per-recipient results, schedules the next attempt or finishes."""
        max_age_us = int(self.max_age_s * 1e6)

        def fn(tr: Transaction) -> Recorded:
            entry = _load(tr, job_id)
            if entry is None:
                raise NotFound(f"queue entry {job_id} not found")
            by_email = {r.email: r for r in entry.recipients}
            newly: list[str] = []
            entry.attempts += 1
            entry.last_attempt_time.CopyFrom(ts(now))
            if remote_mta:
                entry.remote_mta = remote_mta
            for res in results:
                r = by_email.get(res.email)
                if r is None or r.state not in PENDING:
                    continue
                r.attempts += 1
                r.last_reply = res.reply[:1000]
                r.updated_time.CopyFrom(ts(now))
                if res.outcome == "delivered":
                    r.state = types_pb2.RECIPIENT_STATE_DELIVERED
                elif res.outcome == "bounced":
                    r.state = types_pb2.RECIPIENT_STATE_BOUNCED
                    newly.append(r.email)
                else:
                    r.state = types_pb2.RECIPIENT_STATE_DEFERRED
            if results:
                deferred = [x for x in results if x.outcome == "deferred"]
                entry.last_reply = (deferred[-1] if deferred else results[-1]).reply[:1000]
            pending = [r for r in entry.recipients if r.state in PENDING]
            expire = us_of(entry.expire_time) or us_of(entry.create_time) + max_age_us
            if pending and now >= expire:
                for r in pending:  # RFC 3463 4.4.7: delivery time expired
                    r.state = types_pb2.RECIPIENT_STATE_BOUNCED
                    r.last_reply = f"4.4.7 delivery time expired; last reply: {r.last_reply}"[:1000]
                    r.updated_time.CopyFrom(ts(now))
                    newly.append(r.email)
                pending = []
            if entry.mail_from:  # RFC 3464 2: never a bounce for the null sender
                entry.bounce_pending.extend(e for e in newly if e not in entry.bounce_pending)
            entry.status_synced = False
            delete_blob = False
            if pending:
                entry.state = spb.QUEUE_ENTRY_STATE_DEFERRED
                failures = max(r.attempts for r in pending)
                nxt = min(now + int(self.delay_after(failures) * 1e6), expire)
                entry.next_attempt_time.CopyFrom(ts(nxt))
                tr.clear(key("lease", job_id))
            else:
                entry.state = _final_state(entry)
                entry.ClearField("next_attempt_time")
                delete_blob = _finish(tr, entry, now)
            tr.set(key("job", job_id), entry.SerializeToString())
            return Recorded(entry, not pending, delete_blob, newly)

        return await self.db.run(fn)

    async def mark_synced(self, job_id: str, snapshot: spb.QueueEntry, notified: list[str]) -> None:
        """The states in `snapshot` are on the SENT message and `notified` got their DSN."""
        def fn(tr: Transaction) -> None:
            entry = _load(tr, job_id)
            if entry is None:
                return
            remaining = [e for e in entry.bounce_pending if e not in notified]
            del entry.bounce_pending[:]
            entry.bounce_pending.extend(remaining)
            if list(entry.recipients) == list(snapshot.recipients) and not remaining:
                entry.status_synced = True
            tr.set(key("job", job_id), entry.SerializeToString())

        await self.db.run(fn)

    # --- the operator's side ----------------------------------------------------------------------
    async def get(self, job_id: str) -> spb.QueueEntry:
        entry = await self.db.run(lambda tr: _load(tr, job_id), readonly=True)
        if entry is None:
            raise NotFound(f"queue entry {job_id} not found")
        return entry

    async def generation(self, job_id: str) -> int:
        return await self.db.run(lambda tr: decode_counter(tr.get(key("gen", job_id))), readonly=True)

    async def list_active(self, domain: str, page_size: int, page_token: str) -> tuple[list[spb.QueueEntry], str]:
        n = 100 if page_size <= 0 else min(page_size, 1000)
        first, end = store.prefix_range("active")
        begin = self.pages.start(page_token, "", first, end)

        def fn(tr: Transaction) -> tuple[list[spb.QueueEntry], str]:
            out: list[spb.QueueEntry] = []
            cursor = begin
            last = b""
            while len(out) < n:
                rows = tr.get_range(cursor, end, limit=max(n * 2, 64))
                if not rows:
                    return out, ""
                for k, _ in rows:
                    last = k
                    job_id = str(store.unpack(k)[-1])
                    entry = _load(tr, job_id)
                    if entry is not None and (not domain or entry.domain == domain.lower()):
                        out.append(entry)
                        if len(out) == n:
                            break
                cursor = last + b"\x00"
            more = bool(tr.get_range(cursor, end, limit=1))
            return out, self.pages.next("", first, last) if more else ""

        return await self.db.run(fn, readonly=True)

    async def schedule_now(self, job_id: str, gen: int, now: int) -> spb.QueueEntry:
        """RetryQueueEntry: the next attempt is due now, made by a message of generation `gen`."""
        def fn(tr: Transaction) -> spb.QueueEntry:
            entry = _load(tr, job_id)
            if entry is None:
                raise NotFound(f"queue entry {job_id} not found")
            if entry.state not in ACTIVE_STATES:
                raise FailedPrecondition(f"queue entry {job_id} is finished")
            current = decode_counter(tr.get(key("gen", job_id)))
            if gen > current:
                tr.add(key("gen", job_id), gen - current)
            entry.next_attempt_time.CopyFrom(ts(now))
            tr.set(key("job", job_id), entry.SerializeToString())
            return entry

        return await self.db.run(fn)

    async def cancel(self, job_id: str, now: int) -> tuple[spb.QueueEntry, bool]:
        """CancelQueueEntry: pending recipients bounce; (entry, delete the blob)."""
        def fn(tr: Transaction) -> tuple[spb.QueueEntry, bool]:
            entry = _load(tr, job_id)
            if entry is None:
                raise NotFound(f"queue entry {job_id} not found")
            if entry.state not in ACTIVE_STATES:
                raise FailedPrecondition(f"queue entry {job_id} is finished")
            newly = []
            for r in entry.recipients:
                if r.state in PENDING:
                    r.state = types_pb2.RECIPIENT_STATE_BOUNCED
                    r.last_reply = "5.3.0 delivery cancelled by the administrator"
                    r.updated_time.CopyFrom(ts(now))
                    newly.append(r.email)
            if entry.mail_from:
                entry.bounce_pending.extend(newly)
            entry.state = spb.QUEUE_ENTRY_STATE_CANCELLED
            entry.last_reply = "cancelled by the administrator"
            entry.status_synced = False
            entry.ClearField("next_attempt_time")
            delete_blob = _finish(tr, entry, now)
            tr.set(key("job", job_id), entry.SerializeToString())
            return entry, delete_blob

        return await self.db.run(fn)

    async def purge(self, before_us: int, limit: int = 500) -> int:
        """Forgets finished entries that finished before `before_us`."""
        def fn(tr: Transaction) -> int:
            begin, _ = store.prefix_range("finished")
            rows = tr.get_range(begin, key("finished", before_us), limit=limit)
            for k, _ in rows:
                job_id = str(store.unpack(k)[-1])
                tr.clear(k)
                tr.clear(key("job", job_id))
                tr.clear(key("gen", job_id))
                tr.clear(key("lease", job_id))
            return len(rows)

        return await self.db.run(fn)


def dsn_key(job_id: str, emails: list[str]) -> str:
    """The idempotency key of the DSN for these bounced recipients of a job."""
    digest = hashlib.sha256("\n".join(sorted(emails)).encode()).hexdigest()[:16]
    return f"dsn-{job_id}-{digest}"


__all__ = ["ACTIVE_STATES", "Claim", "GEN_HEADER", "PENDING", "QueueStore", "RcptResult", "Recorded", "dsn_key",
           "entry_name", "job_of", "parse_schedule"]
