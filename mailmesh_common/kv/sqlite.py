"""The embedded KV driver: one ordered SQLite table, one writer thread, a pool of readers.

- `kv(k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID`: SQLite compares BLOBs with memcmp, then by
  length, which is FoundationDB's key order.
- WAL + synchronous=FULL: a transaction is on disk when its `run` returns.
- Writes are serialized through ONE writer thread and connection (`BEGIN IMMEDIATE`), so there
  are no conflicts to retry. Group commit: transaction functions that queue up while the writer
  is busy run in one SQLite transaction, each inside its own SAVEPOINT (a function that raises
  rolls back only its own savepoint), with one COMMIT (one fsync); their `run` calls return
  after that COMMIT. This is serializable: the functions run one after the other and commit
  together.
- Read-only transactions run on a pool of reader connections (`BEGIN` deferred: a consistent
  snapshot), concurrently with the writer, and never see uncommitted writes.
- Other processes may open the same file (busy_timeout); SQLite's file lock serializes writers.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

from mailmesh_common.errors import ConfigError, Unavailable
from mailmesh_common.kv.base import (
    CheckedTransaction,
    Transaction,
    add_values,
    call_transaction_fn,
    refuse_nested,
)

T = TypeVar("T")

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 5000
# Page cache per connection (KiB; SQLite's default is 2 MiB). The writer reads the pages it
# updates (counters, index ends, the changelog) over and over: a cache that holds them saves a
# read per miss. Memory grows only with the pages actually used.
WRITER_CACHE_KIB = 64 * 1024
READER_CACHE_KIB = 16 * 1024
# WAL frames between automatic checkpoints (SQLite's default is 1000). A delivery dirties a page
# per key range it touches (dozens) and the same hot pages recur from commit to commit: a longer
# interval copies each of them into the database file once per checkpoint instead of several
# times (~8 % fewer page writes, ~20 % less CPU in COMMIT). The WAL file is reused at ~16 MiB.
WAL_CHECKPOINT_PAGES = 4000
# Group commit: at most this many functions, gathered for at most this long, per COMMIT.
MAX_BATCH = 64
MAX_BATCH_SECONDS = 0.02
# Attempts at a transaction function whose SQLite transaction failed (e.g. an I/O error).
MAX_ATTEMPTS = 3

_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6

_GET = "SELECT v FROM kv WHERE k = ?"
_RANGE = "SELECT k, v FROM kv WHERE k >= ? AND k < ? ORDER BY k LIMIT ?"
_RANGE_REVERSE = "SELECT k, v FROM kv WHERE k >= ? AND k < ? ORDER BY k DESC LIMIT ?"
_SET = "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
# FDB's atomic ADD in one statement: mm_add (add_values, registered on the writer connection)
# applied to the stored value, or to nothing when the key is new.
_ADD = ("INSERT INTO kv (k, v) VALUES (?1, mm_add(NULL, ?2)) "
        "ON CONFLICT (k) DO UPDATE SET v = mm_add(v, ?2)")
_CLEAR = "DELETE FROM kv WHERE k = ?"
_CLEAR_RANGE = "DELETE FROM kv WHERE k >= ? AND k < ?"


def _is_busy(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in (_SQLITE_BUSY, _SQLITE_LOCKED)


def _unavailable(e: sqlite3.Error) -> Unavailable:
    # sqlite messages ("disk I/O error", "database or disk is full") carry no paths or SQL.
    return Unavailable(f"kv store unavailable: {e}")


def _sql_add(old: bytes | None, delta: int) -> bytes:
    return add_values(old, delta)


class _DatabaseFailure(Exception):
    """Internal: the SQLite operation inside a transaction function failed."""


class SqliteTransaction(CheckedTransaction):
    """A transaction on an open SQLite connection; writes are plain SQL (read-your-writes)."""

    __slots__ = ("_cursor", "_execute", "db_error")

    def __init__(self, conn: sqlite3.Connection, *, readonly: bool) -> None:
        super().__init__(readonly=readonly)
        # one cursor for the transaction: every result is consumed before the next statement,
        # and close() resets the last one before the savepoint is released or rolled back
        self._cursor = conn.cursor()
        self._execute = self._cursor.execute
        # The sqlite3.Error an operation hit, if any (the function may have swallowed it).
        self.db_error: sqlite3.Error | None = None

    def close(self) -> None:
        super().close()
        try:
            self._cursor.close()
        except sqlite3.Error:  # closing only resets a statement; nothing to report
            pass

    def _fail(self, e: sqlite3.Error) -> Unavailable:
        self.db_error = e
        return _unavailable(e)

    def _get(self, key: bytes) -> bytes | None:
        try:
            row = self._execute(_GET, (key,)).fetchone()
        except sqlite3.Error as e:
            raise self._fail(e) from None
        return None if row is None else row[0]

    def _get_range(self, begin: bytes, end: bytes, limit: int,
                   reverse: bool) -> list[tuple[bytes, bytes]]:
        try:
            return self._execute(_RANGE_REVERSE if reverse else _RANGE,
                                 (begin, end, limit or -1)).fetchall()
        except sqlite3.Error as e:
            raise self._fail(e) from None

    def _set(self, key: bytes, value: bytes) -> None:
        try:
            self._execute(_SET, (key, value))
        except sqlite3.Error as e:
            raise self._fail(e) from None

    def _clear(self, key: bytes) -> None:
        try:
            self._execute(_CLEAR, (key,))
        except sqlite3.Error as e:
            raise self._fail(e) from None

    def _clear_range(self, begin: bytes, end: bytes) -> None:
        try:
            self._execute(_CLEAR_RANGE, (begin, end))
        except sqlite3.Error as e:
            raise self._fail(e) from None

    def _add(self, key: bytes, delta: int) -> None:
        try:
            self._execute(_ADD, (key, delta))
        except sqlite3.Error as e:
            raise self._fail(e) from None


@dataclass(slots=True, eq=False)
class _Job:
    fn: Callable[[Transaction], Any]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    attempts: int = 0
    started: bool = False

    def claim(self) -> bool:
        """Mark the job running; False if its caller cancelled it before it started."""
        if self.started:
            return True
        if self.future.cancelled() or not self.future.set_running_or_notify_cancel():
            return False
        self.started = True
        return True


class SqliteDatabase:
    """The embedded Database. Create with open_database("sqlite:///path") or SqliteDatabase(path)."""

    def __init__(self, path: str | Path, *, readers: int = 4) -> None:
        self.path = Path(path)
        if str(path) in ("", ":memory:"):
            raise ConfigError("kv: the sqlite driver needs a file path, not an in-memory database")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._wconn = self._connect()
            self._wconn.create_function("mm_add", 2, _sql_add, deterministic=True)
            mode = self._wconn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(f"kv: sqlite could not enable WAL mode (got {mode})")
            self._wconn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
            self._wconn.execute(
                "CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
        except sqlite3.Error as e:
            raise Unavailable(f"kv store unavailable: cannot open the database: {e}") from None
        except OSError as e:  # strerror, not str(e): no paths in messages
            raise Unavailable(f"kv store unavailable: cannot open the database: {e.strerror}") from None

        self._closed = False
        self._lock = threading.Lock()
        self._queue: SimpleQueue[_Job | None] = SimpleQueue()
        self._writer = threading.Thread(target=self._writer_loop, name="kv-sqlite-writer", daemon=True)
        self._writer.start()

        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._readers = concurrent.futures.ThreadPoolExecutor(
            max_workers=readers, thread_name_prefix="kv-sqlite-reader")

    def _connect(self, *, query_only: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               cached_statements=256)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA cache_size=-{READER_CACHE_KIB if query_only else WRITER_CACHE_KIB}")
        if query_only:
            conn.execute("PRAGMA query_only=ON")
        return conn

    # Public API.

    async def run(self, fn: Callable[[Transaction], T], *, readonly: bool = False) -> T:
        if readonly:
            self._check_open()
            try:
                future = asyncio.get_running_loop().run_in_executor(self._readers, self._read, fn)
            except RuntimeError:  # the reader pool was shut down
                raise Unavailable("kv database is closed") from None
            return await future
        return await asyncio.wrap_future(self._submit(fn))  # type: ignore[no-any-return]

    def run_sync(self, fn: Callable[[Transaction], T], *, readonly: bool = False) -> T:
        refuse_nested()
        if readonly:
            self._check_open()
            try:
                sync_future = self._readers.submit(self._read, fn)
            except RuntimeError:  # the reader pool was shut down
                raise Unavailable("kv database is closed") from None
            return sync_future.result()
        return self._submit(fn).result()  # type: ignore[no-any-return]

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._writer.join()
        self._readers.shutdown(wait=True)
        for conn in self._reader_conns:
            conn.close()
        self._reader_conns.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("kv database is closed")

    # Readers.

    def _reader_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(query_only=True)
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    def _read(self, fn: Callable[[Transaction], T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                conn = self._reader_conn()
            except sqlite3.Error as e:
                raise _unavailable(e) from None
            tr = SqliteTransaction(conn, readonly=True)
            try:
                conn.execute("BEGIN")
                result = call_transaction_fn(fn, tr)
            except sqlite3.Error as e:  # BEGIN itself
                tr.db_error = e
            except BaseException:
                if tr.db_error is None:
                    raise
            else:
                if tr.db_error is None:
                    return result
            finally:
                tr.close()
                if conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        log.warning("kv: rollback of a read transaction failed", exc_info=True)
            # A database error, even if the function swallowed it.
            assert tr.db_error is not None
            if not _is_busy(tr.db_error) or attempt >= MAX_ATTEMPTS:
                raise _unavailable(tr.db_error)
            time.sleep(0.01 * attempt)

    # The writer.

    def _submit(self, fn: Callable[[Transaction], Any]) -> concurrent.futures.Future[Any]:
        job = _Job(fn)
        with self._lock:
            self._check_open()
            self._queue.put(job)
        return job.future

    def _writer_loop(self) -> None:
        pending: collections.deque[_Job | None] = collections.deque()
        while True:
            job = pending.popleft() if pending else self._queue.get()
            if job is None:
                break
            try:
                self._run_batch(job, pending)
            except BaseException:  # never let the writer die; _run_batch resolves its jobs
                log.exception("kv: sqlite writer failed a batch")
        self._wconn.close()

    def _next_job(self, pending: collections.deque[_Job | None]) -> _Job | None:
        if pending:
            job = pending.popleft()
        else:
            try:
                job = self._queue.get_nowait()
            except Empty:
                return None
        if job is None:  # the stop sentinel: leave it for the main loop
            pending.appendleft(None)
        return job

    def _run_batch(self, first: _Job, pending: collections.deque[_Job | None]) -> None:
        conn = self._wconn
        done: list[tuple[_Job, bool, Any]] = []
        current: _Job | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            batch_started = time.monotonic()
            job: _Job | None = first
            while job is not None:
                if job.claim():
                    current = job
                    done.append(self._run_one(job))
                    current = None
                if len(done) >= MAX_BATCH or time.monotonic() - batch_started > MAX_BATCH_SECONDS:
                    break
                job = self._next_job(pending)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            # The SQLite transaction is lost: nothing of this batch is committed.
            self._rollback()
            for j, ok, err in done:
                if not ok:
                    j.future.set_exception(err)
            lost = [j for j, ok, _ in done if ok]
            if current is not None:
                lost.append(current)
            elif not done:
                lost.append(first)
            self._retry_or_fail(lost, e, pending)
            return
        except BaseException as e:  # a bug here: fail the batch rather than hang its callers
            log.exception("kv: sqlite writer failed a batch")
            self._rollback()
            for j in [j for j, _, _ in done] + ([current] if current else []) + [first]:
                if not j.future.done() and j.claim():
                    j.future.set_exception(e)
            return
        for j, ok, value in done:
            if ok:
                j.future.set_result(value)
            else:
                j.future.set_exception(value)

    def _run_one(self, job: _Job) -> tuple[_Job, bool, Any]:
        """Run one function in its own savepoint; sqlite3.Error means the batch is lost."""
        conn = self._wconn
        conn.execute("SAVEPOINT fn")
        tr = SqliteTransaction(conn, readonly=False)
        ok = False
        result: Any
        try:
            result = call_transaction_fn(job.fn, tr)
            ok = True
        except BaseException as e:
            result = e
        finally:
            tr.close()
        if tr.db_error is not None:
            if not conn.in_transaction:  # SQLite rolled back everything (e.g. an I/O error)
                raise tr.db_error
            if ok:  # the function swallowed a database error: do not commit its work
                ok, result = False, _unavailable(tr.db_error)
        if not ok:
            conn.execute("ROLLBACK TO fn")
        conn.execute("RELEASE fn")
        return job, ok, result

    def _rollback(self) -> None:
        if self._wconn.in_transaction:
            try:
                self._wconn.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("kv: rollback of a write transaction failed", exc_info=True)

    def _retry_or_fail(self, jobs: list[_Job], e: sqlite3.Error,
                       pending: collections.deque[_Job | None]) -> None:
        """Re-run the jobs of a lost SQLite transaction (bounded), or fail them with Unavailable."""
        retry: list[_Job] = []
        for job in jobs:
            job.attempts += 1
            # BUSY: another process held the write lock for the whole busy_timeout; give up.
            if _is_busy(e) or job.attempts >= MAX_ATTEMPTS:
                if job.claim():
                    job.future.set_exception(_unavailable(e))
            else:
                retry.append(job)
        log.warning("kv: sqlite write transaction failed (%s); retrying %d of %d functions",
                    e, len(retry), len(jobs))
        if retry:
            time.sleep(0.01 * retry[0].attempts)
            pending.extendleft(reversed(retry))
