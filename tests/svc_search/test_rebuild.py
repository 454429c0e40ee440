"""A lost, unreadable or outdated tantivy index is rebuilt from the mailbox store at start, in
the background: the service starts at once, GetIndexStatus shows the rebuild and its progress,
searches answer UNAVAILABLE until the user's documents are back (never a partial answer), and
a rebuild cut short by a stop starts again at the next start."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from mailmesh.v1 import search_service_pb2 as pb

from svc_search.backends.tantivy import SCHEMA_MARKER
from tests.svc_search.conftest import Mesh, Search, start_mesh, start_search, stop_mesh, stop_search
from tests.svc_search.test_lifecycle import answers, fill

pytestmark = pytest.mark.asyncio(loop_scope="function")

EXTRA = 260  # more than one reindex chunk (200): the rebuild takes the store lock at least twice


@pytest_asyncio.fixture(loop_scope="function")
async def own_mesh(tmp_path: Path, nats_url: str) -> AsyncIterator[Mesh]:
    mesh = await start_mesh(tmp_path, nats_url)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


async def status(s: Search) -> pb.GetIndexStatusResponse:
    return await s.stub.GetIndexStatus(pb.GetIndexStatusRequest(), metadata=s.md())


async def rebuilt(s: Search, timeout: float = 90.0) -> pb.GetIndexStatusResponse:
    deadline = time.monotonic() + timeout
    while (st := await status(s)).rebuilding:
        assert time.monotonic() < deadline, f"rebuild not finished within {timeout}s: {st}"
        await asyncio.sleep(0.05)
    return st


async def expect_unavailable(s: Search, user: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.page(user, "quarterly")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "being rebuilt" in (err.value.details() or "")


def index_dir(s: Search) -> Path:
    return Path(s.ctx.settings.data_dir) / "search"


async def test_a_lost_index_is_rebuilt_in_the_background(own_mesh: Mesh) -> None:
    s = await start_search(own_mesh)
    try:
        assert (await status(s)).rebuild_reason == ""  # a first start replays EVENTS instead
        user = (await own_mesh.admin_setup("example.com", ("gina",)))["gina"]
        await fill(s, user)
        for start in range(0, EXTRA, 20):
            await asyncio.gather(*(s.add(user, f"Filler {i}", "padding words") for i in range(start, start + 20)))
        await s.settle(user, timeout=120)
        before = await answers(s, user)
        before_docs = (await s.stub.GetIndexStatus(pb.GetIndexStatusRequest(parent=f"users/{user}"),
                                                   metadata=s.md())).documents
    finally:
        await stop_search(s)
    path = index_dir(s)

    # 1. the index directory is deleted between runs; searches wait for the rebuild
    shutil.rmtree(path)
    s = await start_search(own_mesh)
    try:
        lock = s.ctx.components["store"].lock
        async with lock:  # holds the rebuild at its next write: it is certainly running now
            st = await status(s)
            assert st.rebuilding and st.rebuild_reason == "index missing"
            await expect_unavailable(s, user)
        st = await rebuilt(s)
        assert st.rebuild_users_done == st.rebuild_users_total >= 1
        assert st.rebuild_documents >= before_docs
        assert await answers(s, user) == before
        # 2. stopped in the middle of a rebuild: the next start rebuilds again
        await stop_search(s)
        shutil.rmtree(path)
        s = await start_search(own_mesh)
        lock = s.ctx.components["store"].lock
        await lock.acquire()
        try:
            assert (await status(s)).rebuilding
            await stop_search(s)
        finally:
            lock.release()
        s = await start_search(own_mesh)
        st = await status(s)
        assert st.rebuild_reason.startswith("a rebuild was interrupted"), st
        await rebuilt(s)
        assert await answers(s, user) == before
    finally:
        await stop_search(s)

    # 3. an unreadable index, and one of another schema version, are set aside and rebuilt
    for damage, reason in ((lambda: (path / "meta.json").write_text("garbage{"), "index unreadable"),
                           (lambda: (path / SCHEMA_MARKER).write_text("0"), "index schema changed")):
        damage()
        s = await start_search(own_mesh)
        try:
            st = await status(s)
            assert st.rebuild_reason.startswith(reason), st
            st = await rebuilt(s)
            assert st.rebuild_users_done == st.rebuild_users_total
            assert await answers(s, user) == before
        finally:
            await stop_search(s)
        assert (path.parent / "search.old").is_dir()  # the damaged index is kept aside, not destroyed
    # 4. an intact index starts without a rebuild
    s = await start_search(own_mesh)
    try:
        st = await status(s)
        assert not st.rebuilding and st.rebuild_reason == ""
        assert await answers(s, user) == before
    finally:
        await stop_search(s)
