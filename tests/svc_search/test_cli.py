"""`mailmesh search reindex|query|status` against a running mailbox and search service."""

from __future__ import annotations

import asyncio

import pytest
from mailmesh.v1 import mailbox_service_pb2 as mpb

from mailmesh_common.cli.main import run
from tests.svc_search.conftest import Search, new_users

pytestmark = pytest.mark.asyncio(loop_scope="module")


def run_cli(*argv: str) -> int:
    return run(argv)


@pytest.fixture
def cli_env(searchmesh: Search, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    s = searchmesh.ctx.settings
    monkeypatch.setenv("MAILMESH_MAILBOX_PORT", str(s.mailbox_port))
    monkeypatch.setenv("MAILMESH_SEARCH_PORT", str(s.search_port))
    return ["--data-dir", str(s.data_dir)]


async def test_reindex_query_and_status(searchmesh: Search, cli_env: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    s = searchmesh
    user = (await new_users(s, "olga"))["olga"]
    email = (await s.mesh.stub.GetAccount(mpb.GetAccountRequest(name=f"users/{user}"), metadata=s.md())).account.email
    mid = await s.add(user, "Operator check", "the turbine is spinning")
    await s.add(user, "Other", "nothing here")
    await s.settle(user)
    assert await asyncio.to_thread(run_cli, "search", "query", "--user", email, "turbine", *cli_env) == 0
    out = capsys.readouterr()
    assert mid in out.out and "turbine" in out.out and "1 shown of about 1" in out.err
    assert await asyncio.to_thread(run_cli, "search", "reindex", "--user", email, "--quiet", *cli_env) == 0
    assert "reindexed 1 user(s): 2 documents, 0 stale removed" in capsys.readouterr().out
    assert await asyncio.to_thread(run_cli, "search", "status", "--user", email, *cli_env) == 0
    assert "backend tantivy\tdocuments 2" in capsys.readouterr().out
    assert await asyncio.to_thread(run_cli, "search", "query", "--user", email, "from:", *cli_env) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert await asyncio.to_thread(run_cli, "search", "reindex", "--user", "nobody@nowhere.test", *cli_env) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
