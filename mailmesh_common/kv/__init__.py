"""FoundationDB-shaped transactional KV: one API, an embedded SQLite driver and a FoundationDB driver.

    db = open_database("sqlite:///var/lib/mailmesh/kv.db")   # or "fdb:/etc/foundationdb/fdb.cluster"
    space = root_subspace()
    await db.run(lambda tr: tr.set(space.pack(("user", 42)), b"..."))

open_database picks the driver from the URL:
- `sqlite:///abs/path.db`, `sqlite:relative/path.db` or a plain path: the embedded SQLite driver;
- `fdb:/path/to/fdb.cluster`, or `fdb:` alone (cluster file from MAILMESH_FDB_CLUSTER_FILE, else
  FoundationDB's default): the FoundationDB driver;
- None: FoundationDB if MAILMESH_FDB_CLUSTER_FILE is set, otherwise a ConfigError.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from mailmesh_common.errors import ConfigError, Unavailable
from mailmesh_common.kv.base import (
    CHUNK_SIZE,
    DEFAULT_MAX_RETRIES,
    MAX_KEY_SIZE,
    MAX_TRANSACTION_SECONDS,
    MAX_TRANSACTION_SIZE,
    MAX_VALUE_SIZE,
    Database,
    ReadOnlyTransactionError,
    Transaction,
    TransactionTimedOut,
    TransactionTooLarge,
    clear_chunked,
    decode_counter,
    encode_counter,
    get_chunked,
    set_chunked,
    strinc,
)
from mailmesh_common.kv.subspace import Subspace, root_subspace

if TYPE_CHECKING:
    from mailmesh_common.config import Settings

CLUSTER_FILE_ENV = "MAILMESH_FDB_CLUSTER_FILE"

__all__ = [
    "open_service_database",
    "CHUNK_SIZE",
    "CLUSTER_FILE_ENV",
    "MAX_KEY_SIZE",
    "MAX_TRANSACTION_SECONDS",
    "MAX_TRANSACTION_SIZE",
    "MAX_VALUE_SIZE",
    "Database",
    "ReadOnlyTransactionError",
    "Subspace",
    "Transaction",
    "TransactionTimedOut",
    "TransactionTooLarge",
    "clear_chunked",
    "decode_counter",
    "encode_counter",
    "get_chunked",
    "open_database",
    "root_subspace",
    "set_chunked",
    "strinc",
]


def open_database(url: str | os.PathLike[str] | None = None, *, readers: int = 4,
                  max_retries: int = DEFAULT_MAX_RETRIES) -> Database:
    """Open the KV database named by url (see the module docstring).

    readers: reader connections of the SQLite driver. max_retries: FoundationDB retry limit.
    """
    if url is None:
        if not os.environ.get(CLUSTER_FILE_ENV):
            raise ConfigError(f"kv: no database configured: pass a sqlite path or set {CLUSTER_FILE_ENV}")
        url = "fdb:"
    url = os.fspath(url)
    if url.startswith("fdb:"):
        from mailmesh_common.kv.foundationdb import FdbDatabase

        cluster_file = url.removeprefix("fdb:").removeprefix("//") or None
        return FdbDatabase(cluster_file, max_retries=max_retries)
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite:")
        if path.startswith("//"):  # sqlite:///abs/path -> /abs/path (empty URL host)
            path = path[2:]
        url = path
    if not url:
        raise ConfigError("kv: empty database path")
    from mailmesh_common.kv.sqlite import SqliteDatabase

    return SqliteDatabase(url, readers=readers)


def open_service_database(settings: Settings, file_name: str, what: str) -> Database:
    """A service's KV store: the shared FoundationDB cluster when `fdb_cluster_file` is set (each
    service keeps to its own subspace), else the embedded SQLite file `{data_dir}/{file_name}`.
    Unavailable, naming `what` ("the send store"), when it cannot be opened."""
    if settings.fdb_cluster_file:
        return open_database(f"fdb:{settings.fdb_cluster_file}")
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return open_database(str(settings.data_dir / file_name))
    except OSError as exc:
        raise Unavailable(f"cannot open {what}: {exc.strerror}") from exc
