"""Fixtures for the contract suites: the same tests run on every KV driver.

`db` is parametrized over drivers: "sqlite" always (a fresh file under tmp_path), "fdb" when
MAILMESH_FDB_CLUSTER_FILE names a cluster file (skipped with that reason otherwise). `space` is
a fresh subspace per test; on FoundationDB it is cleared before and after the test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from mailmesh_common.kv import CLUSTER_FILE_ENV, Database, Subspace, Transaction, open_database


@pytest_asyncio.fixture(params=["sqlite", "fdb"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        database = open_database(f"sqlite://{tmp_path / 'kv.db'}")
    else:
        cluster_file = os.environ.get(CLUSTER_FILE_ENV)
        if not cluster_file:
            pytest.skip(f"FoundationDB not configured: set {CLUSTER_FILE_ENV} to run the fdb driver")
        database = open_database(f"fdb:{cluster_file}")
    try:
        yield database
    finally:
        await database.close()


@pytest_asyncio.fixture
async def space(db: Database) -> AsyncIterator[Subspace]:
    """A subspace of its own for one test, empty at the start and cleared at the end."""
    sub = Subspace(("mm-test", uuid.uuid4().hex))

    def clear(tr: Transaction) -> None:
        tr.clear_range(sub.key, sub.key + b"\xff")

    await db.run(clear)
    try:
        yield sub
    finally:
        await db.run(clear)
