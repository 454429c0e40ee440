"""open_service_database: each service's embedded store in the data dir, a clear error when the
data dir cannot hold it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailmesh_common.config import load_settings
from mailmesh_common.errors import Unavailable
from mailmesh_common.kv import open_service_database
from svc_gateway.clients import open_gateway_db
from svc_send.store import open_send_db


async def test_each_service_gets_its_own_file_in_the_data_dir(tmp_path: Path) -> None:
    s = load_settings(env={"MAILMESH_DATA_DIR": str(tmp_path / "new" / "data")})
    dbs = [open_gateway_db(s), open_send_db(s), open_service_database(s, "x.db", "the x store")]
    try:
        await dbs[0].run(lambda tr: tr.set(b"k", b"gateway"))
        await dbs[1].run(lambda tr: tr.set(b"k", b"send"))
        assert await dbs[0].run(lambda tr: tr.get(b"k"), readonly=True) == b"gateway"
        assert await dbs[1].run(lambda tr: tr.get(b"k"), readonly=True) == b"send"
    finally:
        for db in dbs:
            await db.close()
    assert {p.name for p in (tmp_path / "new" / "data").glob("*.db")} == {"gateway.db", "send.db", "x.db"}


def test_unusable_data_dir_is_unavailable_naming_the_store(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    s = load_settings(env={"MAILMESH_DATA_DIR": str(blocker / "data")})
    with pytest.raises(Unavailable, match="cannot open the send store"):
        open_send_db(s)
