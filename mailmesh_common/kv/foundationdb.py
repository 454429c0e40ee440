"""The distributed KV driver: a thin wrapper over the official `foundationdb` Python bindings.

`fdb` is imported only when this driver is opened, because the bindings need the FoundationDB
C client (libfdb_c), which the embedded mode does not install. Transaction functions run on a
thread pool (FDB futures block) inside the standard retry loop: `commit().wait()`, and on
`fdb.FDBError` `on_error(e).wait()` then retry; `on_error` re-raises errors that are not
retryable, and any error once the retry limit is reached.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from mailmesh_common.errors import ConfigError, MailmeshError, Unavailable
from mailmesh_common.kv.base import (
    DEFAULT_MAX_RETRIES,
    MAX_KEY_SIZE,
    MAX_TRANSACTION_SECONDS,
    MAX_TRANSACTION_SIZE,
    MAX_VALUE_SIZE,
    CheckedTransaction,
    Transaction,
    TransactionTimedOut,
    TransactionTooLarge,
    call_transaction_fn,
    refuse_nested,
)

T = TypeVar("T")

API_VERSION = 730
CLUSTER_FILE_ENV = "MAILMESH_FDB_CLUSTER_FILE"

# https://apple.github.io/foundationdb/api-error-codes.html
_TIMED_OUT = 1031  # transaction_timed_out
_TOO_OLD = 1007  # transaction_too_old (the 5 s MVCC window)
_TOO_LARGE = {2101: "transaction too large", 2102: "key too large", 2103: "value too large"}
_CONFLICT = 1020  # not_committed

_api_lock = threading.Lock()


def _load_fdb() -> Any:
    """Import the bindings and select API_VERSION once per process."""
    try:
        import fdb
    except ImportError as e:  # pragma: no cover - the wheel is a dependency
        raise ConfigError(f"kv: the foundationdb bindings are not installed: {e}") from None
    with _api_lock:
        if not fdb.is_api_version_selected():
            try:
                fdb.api_version(API_VERSION)
            except (OSError, RuntimeError) as e:
                raise Unavailable(f"kv store unavailable: cannot load the FoundationDB client: {e}") \
                    from None
    return fdb


def _map_error(e: Exception, retries: int) -> MailmeshError:
    """The MailmeshError for an FDBError that on_error did not retry."""
    code = getattr(e, "code", 0)
    if code in _TOO_LARGE:
        limits = {2101: MAX_TRANSACTION_SIZE, 2102: MAX_KEY_SIZE, 2103: MAX_VALUE_SIZE}
        return TransactionTooLarge(f"{_TOO_LARGE[code]}: the limit is {limits[code]} bytes")
    if code in (_TIMED_OUT, _TOO_OLD):
        return TransactionTimedOut(
            f"transaction exceeded the {MAX_TRANSACTION_SECONDS:g} s limit (FoundationDB error {code})")
    if code == _CONFLICT:
        return Unavailable(f"kv transaction still conflicting after {retries} retries")
    return Unavailable(f"kv store unavailable: FoundationDB error {code}")


class FdbTransaction(CheckedTransaction):
    """Our limits in front of an `fdb.Transaction` (which also enforces them natively)."""

    __slots__ = ("_tr",)

    def __init__(self, tr: Any, *, readonly: bool) -> None:
        super().__init__(readonly=readonly)
        self._tr = tr

    def _get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._tr.get(key).value
        return value

    def _get_range(self, begin: bytes, end: bytes, limit: int,
                   reverse: bool) -> list[tuple[bytes, bytes]]:
        rows = self._tr.get_range(begin, end, limit=limit, reverse=reverse).to_list()
        return [(kv.key, kv.value) for kv in rows]

    def _set(self, key: bytes, value: bytes) -> None:
        self._tr.set(key, value)

    def _clear(self, key: bytes) -> None:
        self._tr.clear(key)

    def _clear_range(self, begin: bytes, end: bytes) -> None:
        self._tr.clear_range(begin, end)

    def _add(self, key: bytes, delta: int) -> None:
        # Two's complement of delta as 8 bytes little-endian == struct.pack('<q', delta).
        self._tr.add(key, (delta % (1 << 64)).to_bytes(8, "little"))


class FdbDatabase:
    """The FoundationDB Database. Create with open_database("fdb:/path/to/fdb.cluster")."""

    def __init__(self, cluster_file: str | None = None, *, threads: int = 32,
                 max_retries: int = DEFAULT_MAX_RETRIES) -> None:
        cluster_file = cluster_file or os.environ.get(CLUSTER_FILE_ENV) or None
        if cluster_file is not None and not os.path.exists(cluster_file):
            raise ConfigError(f"kv: {CLUSTER_FILE_ENV}: cluster file {cluster_file} does not exist")
        self._fdb = _load_fdb()
        try:
            self._db = self._fdb.open(cluster_file)
        except self._fdb.FDBError as e:
            raise _map_error(e, 0) from None
        self._max_retries = max_retries
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="kv-fdb")

    async def run(self, fn: Callable[[Transaction], T], *, readonly: bool = False) -> T:
        self._check_open()
        try:
            future = asyncio.get_running_loop().run_in_executor(
                self._pool, self._run_blocking, fn, readonly)
        except RuntimeError:  # the pool was shut down
            raise Unavailable("kv database is closed") from None
        return await future

    def run_sync(self, fn: Callable[[Transaction], T], *, readonly: bool = False) -> T:
        refuse_nested()
        self._check_open()
        return self._run_blocking(fn, readonly)

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)

    def close_sync(self) -> None:
        # The FDB network thread is per process and cannot be restarted: leave it running.
        self._closed = True
        self._pool.shutdown(wait=True)

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("kv database is closed")

    def _run_blocking(self, fn: Callable[[Transaction], T], readonly: bool) -> T:
        fdb = self._fdb
        tr = self._db.create_transaction()
        # Since API 610 neither option is reset by on_error: both bound the whole retry loop.
        tr.options.set_timeout(int(MAX_TRANSACTION_SECONDS * 1000))
        tr.options.set_retry_limit(self._max_retries)
        retries = 0
        while True:
            wrapper = FdbTransaction(tr, readonly=readonly)
            try:
                result = call_transaction_fn(fn, wrapper)
                if not readonly:
                    tr.commit().wait()
                return result
            except fdb.FDBError as e:
                try:
                    tr.on_error(e).wait()
                except fdb.FDBError as final:
                    raise _map_error(final, retries) from None
                retries += 1
            finally:
                wrapper.close()
