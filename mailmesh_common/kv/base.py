"""The FoundationDB-shaped transaction API shared by every KV driver, and its limits.

Business code is written against `Transaction` (synchronous, used inside a transaction
function) and `Database` (`await db.run(fn)` retries `fn` on conflicts). Both drivers wrap their
native transaction in `CheckedTransaction`, which enforces FoundationDB's limits with a clear
error: key <= 10,000 bytes, value <= 100,000 bytes, mutations <= 10,000,000 bytes per
transaction, and <= 5 s per transaction, so code that passes on the embedded driver also fits
FoundationDB. Values that may exceed 100 kB go through `set_chunked` / `get_chunked`.
"""

from __future__ import annotations

import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol, TypeVar

import fdb.tuple

from mailmesh_common.errors import InvalidInput, LimitExceeded, MailmeshError, Unavailable

T = TypeVar("T")

# FoundationDB's documented limits (https://apple.github.io/foundationdb/known-limitations.html).
MAX_KEY_SIZE = 10_000
MAX_VALUE_SIZE = 100_000
MAX_TRANSACTION_SIZE = 10_000_000
MAX_TRANSACTION_SECONDS = 5.0
# Keys at or above b"\xff" are FoundationDB's system keyspace.
SYSTEM_KEY_PREFIX = b"\xff"
# Chunk size for set_chunked: leaves headroom below MAX_VALUE_SIZE.
CHUNK_SIZE = 90_000
# Default bound on retries of a transaction function before run() gives up.
DEFAULT_MAX_RETRIES = 100

_COUNTER = struct.Struct("<q")
_U64 = 1 << 64


class TransactionTooLarge(LimitExceeded):
    """A key, value or whole transaction over FoundationDB's size limits; retrying cannot help."""


class TransactionTimedOut(Unavailable):
    """A transaction ran longer than 5 s and was rolled back.

    An Unavailable (temporary): the caller may retry later, e.g. a queue consumer naks with delay.
    """


class ReadOnlyTransactionError(MailmeshError):
    """A write was attempted in a transaction run with readonly=True (a programming error)."""


class Transaction(Protocol):
    """One transaction, as seen by a transaction function. Reads see the transaction's own writes."""

    def get(self, key: bytes) -> bytes | None: ...

    def get_range(self, begin: bytes, end: bytes, *, limit: int = 0,
                  reverse: bool = False) -> list[tuple[bytes, bytes]]:
        """Pairs with begin <= key < end, ordered by key bytes; limit 0 = unlimited."""
        ...

    def get_range_startswith(self, prefix: bytes, *, limit: int = 0,
                             reverse: bool = False) -> list[tuple[bytes, bytes]]: ...

    def set(self, key: bytes, value: bytes) -> None: ...

    def clear(self, key: bytes) -> None: ...

    def clear_range(self, begin: bytes, end: bytes) -> None: ...

    def add(self, key: bytes, delta: int) -> None:
        """FDB atomic ADD: 8-byte little-endian signed int, a missing value counts as 0."""
        ...


class Database(Protocol):
    """A transactional ordered KV store."""

    async def run(self, fn: Callable[[Transaction], T], *, readonly: bool = False) -> T:
        """Run fn(tr) in a worker thread in one transaction and commit it.

        fn is re-run on retryable conflicts (so it must have no other side effects); after a
        bounded number of retries run raises Unavailable. An exception raised by fn rolls the
        transaction back and propagates unchanged.
        """
        ...

    def run_sync(self, fn: Callable[[Transaction], T], *, readonly: bool = False) -> T:
        """Like run, blocking the calling thread; for CLI tools and benchmarks."""
        ...

    async def close(self) -> None: ...

    def close_sync(self) -> None: ...


def encode_counter(n: int) -> bytes:
    """The value FDB's atomic ADD reads and writes: 8-byte little-endian signed."""
    return _COUNTER.pack(n)


def decode_counter(b: bytes | None) -> int:
    """Inverse of encode_counter; None (missing key) is 0, short values are zero-extended."""
    if not b:
        return 0
    if len(b) != 8:
        b = b[:8].ljust(8, b"\x00")
    return int(_COUNTER.unpack(b)[0])


def add_values(old: bytes | None, delta: int) -> bytes:
    """FDB ADD semantics on raw values: little-endian, wraps modulo 2**64."""
    current = int.from_bytes(old[:8], "little") if old else 0
    return ((current + delta) % _U64).to_bytes(8, "little")


def strinc(key: bytes) -> bytes:
    """The first key after every key starting with `key` (FoundationDB's strinc)."""
    stripped = key.rstrip(b"\xff")
    if not stripped:
        raise InvalidInput("key prefix must contain a byte other than 0xff")
    return stripped[:-1] + bytes((stripped[-1] + 1,))


# Set while a transaction function runs on this thread, to refuse nested run_sync (deadlock).
_in_transaction = threading.local()


def in_transaction() -> bool:
    """True on a thread that is currently running a transaction function."""
    return getattr(_in_transaction, "active", False)


def call_transaction_fn(fn: Callable[[Transaction], T], tr: CheckedTransaction) -> T:
    """Call fn(tr) marking the thread as inside a transaction; then check the time limit."""
    _in_transaction.active = True
    try:
        result = fn(tr)
    finally:
        _in_transaction.active = False
    if hasattr(result, "__await__"):
        close = getattr(result, "close", None)
        if close is not None:
            close()
        raise MailmeshError("transaction function must be synchronous, it returned an awaitable")
    tr.check_deadline()
    return result


def refuse_nested() -> None:
    if in_transaction():
        raise MailmeshError("run_sync called from inside a transaction function")


class CheckedTransaction(ABC):
    """Enforces the limits and read-only mode, then delegates to the driver's `_` methods."""

    __slots__ = ("_deadline", "_started", "_written", "_readonly", "_closed")

    def __init__(self, *, readonly: bool) -> None:
        self._started = time.monotonic()
        self._deadline = self._started + MAX_TRANSACTION_SECONDS
        self._written = 0
        self._readonly = readonly
        self._closed = False

    # Driver primitives.

    @abstractmethod
    def _get(self, key: bytes) -> bytes | None: ...

    @abstractmethod
    def _get_range(self, begin: bytes, end: bytes, limit: int,
                   reverse: bool) -> list[tuple[bytes, bytes]]: ...

    @abstractmethod
    def _set(self, key: bytes, value: bytes) -> None: ...

    @abstractmethod
    def _clear(self, key: bytes) -> None: ...

    @abstractmethod
    def _clear_range(self, begin: bytes, end: bytes) -> None: ...

    @abstractmethod
    def _add(self, key: bytes, delta: int) -> None: ...

    # Checks.

    def close(self) -> None:
        """Refuse any further use (the transaction function returned)."""
        self._closed = True

    def check_deadline(self) -> None:
        if self._closed:
            raise MailmeshError("transaction used after its function returned")
        if time.monotonic() > self._deadline:
            elapsed = time.monotonic() - self._started
            raise TransactionTimedOut(
                f"transaction exceeded the {MAX_TRANSACTION_SECONDS:g} s limit "
                f"(ran {elapsed:.1f} s); split the work into smaller transactions")

    def _check_key(self, key: bytes) -> None:
        if type(key) is not bytes:
            raise InvalidInput(f"key must be bytes, not {type(key).__name__}")
        if len(key) > MAX_KEY_SIZE:
            raise TransactionTooLarge(
                f"key too large: {len(key)} bytes, the limit is {MAX_KEY_SIZE} bytes")
        if key >= SYSTEM_KEY_PREFIX:
            raise InvalidInput("key in the system keyspace (starts with 0xff)")

    def _check_write(self, key: bytes, size: int) -> None:
        if self._readonly:
            raise ReadOnlyTransactionError("write attempted in a read-only transaction")
        self.check_deadline()
        self._check_key(key)
        written = self._written + size
        if written > MAX_TRANSACTION_SIZE:
            raise TransactionTooLarge(
                f"transaction too large: {written} bytes of mutations, the limit is "
                f"{MAX_TRANSACTION_SIZE} bytes; split the work into smaller transactions")
        self._written = written

    def _check_range(self, begin: bytes, end: bytes) -> None:
        if type(begin) is not bytes or type(end) is not bytes:
            raise InvalidInput("range keys must be bytes")
        if end > SYSTEM_KEY_PREFIX:
            raise InvalidInput("range end beyond the system keyspace boundary 0xff")

    # The Transaction API.

    def get(self, key: bytes) -> bytes | None:
        self.check_deadline()
        self._check_key(key)
        return self._get(key)

    def get_range(self, begin: bytes, end: bytes, *, limit: int = 0,
                  reverse: bool = False) -> list[tuple[bytes, bytes]]:
        self.check_deadline()
        self._check_range(begin, end)
        if limit < 0:
            raise InvalidInput("limit must be >= 0 (0 = unlimited)")
        if begin >= end:
            return []
        return self._get_range(begin, end, limit, reverse)

    def get_range_startswith(self, prefix: bytes, *, limit: int = 0,
                             reverse: bool = False) -> list[tuple[bytes, bytes]]:
        end = strinc(prefix) if prefix else SYSTEM_KEY_PREFIX
        return self.get_range(prefix, end, limit=limit, reverse=reverse)

    def set(self, key: bytes, value: bytes) -> None:
        if type(value) is not bytes:
            raise InvalidInput(f"value must be bytes, not {type(value).__name__}")
        if len(value) > MAX_VALUE_SIZE:
            raise TransactionTooLarge(
                f"value too large: {len(value)} bytes, the limit is {MAX_VALUE_SIZE} bytes; "
                "use set_chunked for large values")
        self._check_write(key, len(key) + len(value))
        self._set(key, value)

    def clear(self, key: bytes) -> None:
        self._check_write(key, len(key))
        self._clear(key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._check_range(begin, end)
        if begin > end:
            raise InvalidInput("clear_range: begin key is after end key")
        self._check_write(b"", len(begin) + len(end))
        if begin < end:
            self._clear_range(begin, end)

    def add(self, key: bytes, delta: int) -> None:
        if not -(1 << 63) <= delta < (1 << 63):
            raise InvalidInput("add: delta must fit in a signed 64-bit integer")
        self._check_write(key, len(key) + 8)
        self._add(key, delta)


# Chunked values: a value of any size (up to the transaction limit) stored as
# prefix + tuple(i) for i = 0, 1, ...; ints pack with type codes 0x14..0x1c, so the
# chunks of `prefix` are exactly the keys in [prefix + pack((0,)), prefix + b"\x1d").

_CHUNK_END = b"\x1d"


def _chunk_key(prefix: bytes, index: int) -> bytes:
    return prefix + fdb.tuple.pack((index,))


def _chunk_range(prefix: bytes) -> tuple[bytes, bytes]:
    return _chunk_key(prefix, 0), prefix + _CHUNK_END


def set_chunked(tr: Transaction, prefix: bytes, value: bytes) -> None:
    """Store value under prefix split into chunks of at most CHUNK_SIZE bytes (replacing any)."""
    begin, end = _chunk_range(prefix)
    tr.clear_range(begin, end)
    if not value:
        tr.set(begin, b"")
        return
    for index, offset in enumerate(range(0, len(value), CHUNK_SIZE)):
        tr.set(_chunk_key(prefix, index), value[offset:offset + CHUNK_SIZE])


def get_chunked(tr: Transaction, prefix: bytes) -> bytes | None:
    """The value stored by set_chunked under prefix, or None."""
    begin, end = _chunk_range(prefix)
    rows = tr.get_range(begin, end)
    if not rows:
        return None
    for index, (key, _value) in enumerate(rows):
        if key != _chunk_key(prefix, index):
            raise MailmeshError("chunked value is corrupt: a chunk is missing")
    return b"".join(value for _key, value in rows)


def clear_chunked(tr: Transaction, prefix: bytes) -> None:
    """Remove the value stored by set_chunked under prefix."""
    begin, end = _chunk_range(prefix)
    tr.clear_range(begin, end)
