"""Documents follow the mailbox: label and flag changes, trash, deletion forever; the index
survives restarts, redelivery of every event is harmless, and reindex rebuilds the same
answers from the mailbox store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf.field_mask_pb2 import FieldMask
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import search_service_pb2 as pb
from mailmesh.v1 import types_pb2

from mailmesh_common import streams
from svc_search.backends.base import Backend
from svc_search.indexer import DURABLE
from tests.svc_search.conftest import (
    Mesh,
    Search,
    new_users,
    start_mesh,
    start_search,
    stop_mesh,
    stop_search,
)

QUERIES = ("", "quarterly", "label:work", "is:unread", "is:starred", "in:anywhere", "in:trash", "has:attachment",
           '"quarterly report"', "from:dana OR label:work", "-quarterly")


async def fill(s: Search, user: str) -> dict[str, str]:
    md = s.mesh.md()
    work = (await s.mesh.stub.CreateLabel(mpb.CreateLabelRequest(parent=f"users/{user}", name="Work"),
                                          metadata=md)).label.id
    ids = {f"m{i}": await s.add(user, f"Quarterly report {i}", f"numbers for quarter {i}",
                                frm="Dana <dana@fbi.test>" if i % 2 else "Eve <eve@x.test>",
                                labels=["INBOX", work] if i % 3 == 0 else ["INBOX"], starred=i == 4,
                                attachments=[("q.pdf", b"x")] if i == 5 else ())
           for i in range(8)}
    ids["other"] = await s.add(user, "Lunch", "sushi")
    await s.mesh.stub.BatchModifyMessages(mpb.BatchModifyMessagesRequest(
        parent=f"users/{user}", ids=[ids["m1"], ids["m2"]], unread=False), metadata=md)
    await s.mesh.stub.TrashMessage(mpb.TrashMessageRequest(name=f"users/{user}/messages/{ids['m6']}"), metadata=md)
    await s.mesh.stub.DeleteMessage(mpb.DeleteMessageRequest(name=f"users/{user}/messages/{ids['m7']}"), metadata=md)
    await s.settle(user)
    return ids


async def answers(s: Search, user: str) -> dict[str, list[str]]:
    return {q: await s.ids(user, q, page_size=3) for q in QUERIES}


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_label_changes_are_visible_in_label_queries(searchmesh: Search) -> None:
    s = searchmesh
    user = (await new_users(s, "carol"))["carol"]
    md = s.mesh.md()
    a = await s.add(user, "Budget", "the budget")
    b = await s.add(user, "Budget two", "more budget")
    lab = (await s.mesh.stub.CreateLabel(mpb.CreateLabelRequest(parent=f"users/{user}", name="Finance"),
                                         metadata=md)).label
    await s.settle(user)
    await s.expect(user, "label:finance", [])
    await s.mesh.stub.BatchModifyMessages(mpb.BatchModifyMessagesRequest(parent=f"users/{user}", ids=[a],
                                                                         add_label_ids=[lab.id]), metadata=md)
    await s.settle(user)
    await s.expect(user, "label:finance", [a])
    await s.expect(user, "budget -label:finance", [b])
    # a renamed label is found by its new name at once (names are resolved per query)
    await s.mesh.stub.UpdateLabel(mpb.UpdateLabelRequest(name=f"users/{user}/labels/{lab.id}",
                                                         label=types_pb2.Label(name="Money/2024"),
                                                         update_mask=FieldMask(paths=["name"])), metadata=md)
    await s.expect(user, "label:money-2024", [a])
    await s.expect(user, "label:finance", [])
    # flags
    await s.expect(user, "is:starred", [])
    await s.mesh.stub.BatchModifyMessages(mpb.BatchModifyMessagesRequest(
        parent=f"users/{user}", ids=[b], starred=True, unread=False), metadata=md)
    await s.settle(user)
    await s.expect(user, "is:starred", [b])
    await s.expect(user, "is:read", [b])
    await s.expect(user, "is:unread", [a])
    await s.mesh.stub.BatchModifyMessages(mpb.BatchModifyMessagesRequest(
        parent=f"users/{user}", ids=[a], remove_label_ids=[lab.id], add_label_ids=["IMPORTANT"]), metadata=md)
    await s.settle(user)
    await s.expect(user, "label:money-2024", [])
    await s.expect(user, "is:important", [a])


async def test_trashed_and_deleted_messages_disappear(searchmesh: Search) -> None:
    s = searchmesh
    user = (await new_users(s, "dave"))["dave"]
    md = s.mesh.md()
    a = await s.add(user, "Secret plans", "the plans")
    b = await s.add(user, "Other plans", "the plans")
    await s.settle(user)
    await s.expect(user, "plans", [a, b])
    await s.mesh.stub.TrashMessage(mpb.TrashMessageRequest(name=f"users/{user}/messages/{a}"), metadata=md)
    await s.settle(user)
    await s.expect(user, "plans", [b])
    await s.expect(user, "in:trash plans", [a])
    await s.mesh.stub.UntrashMessage(mpb.UntrashMessageRequest(name=f"users/{user}/messages/{a}"), metadata=md)
    await s.settle(user)
    await s.expect(user, "plans", [a, b])
    await s.mesh.stub.DeleteMessage(mpb.DeleteMessageRequest(name=f"users/{user}/messages/{a}"), metadata=md)
    await s.settle(user)
    await s.expect(user, "in:anywhere plans", [b])
    await s.expect(user, "secret", [])
    status = await s.stub.GetIndexStatus(pb.GetIndexStatusRequest(parent=f"users/{user}"), metadata=s.md(user))
    assert status.backend == "tantivy" and status.documents == 1


async def test_reindex_reproduces_the_same_results(searchmesh: Search) -> None:
    s = searchmesh
    user = (await new_users(s, "erin"))["erin"]
    await fill(s, user)
    before = await answers(s, user)
    assert before["quarterly"] and before["label:work"] and before["in:trash"]
    # lose the user's documents, then rebuild them from the mailbox
    backend: Backend = s.ctx.components["backend"]
    docs = list((await backend.get([(user, mid) for q in before.values() for mid in q])).keys())
    await backend.write([], docs)
    assert await s.ids(user, "in:anywhere") == []
    progress = [r async for r in s.stub.Reindex(pb.ReindexRequest(parent=f"users/{user}"), metadata=s.md())]
    assert progress[-1].done and progress[-1].users_done == 1 and progress[-1].documents == 8
    assert await answers(s, user) == before
    # a stale document (its message gone from the mailbox) is removed by a reindex
    from svc_search.documents import SearchDocument

    await backend.write([SearchDocument(user=user, message_id="ghost", subject="quarterly ghost", modseq=1)], [])
    assert len(await s.ids(user, "quarterly")) == len(before["quarterly"]) + 1
    progress = [r async for r in s.stub.Reindex(pb.ReindexRequest(parent=f"users/{user}"), metadata=s.md())]
    assert progress[-1].removed_documents == 1
    assert await answers(s, user) == before


async def test_reindex_and_status_are_administrative(searchmesh: Search) -> None:
    s = searchmesh
    user = (await new_users(s, "frank"))["frank"]
    for req in (pb.ReindexRequest(parent=f"users/{user}"), pb.ReindexRequest(all_users=True)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [r async for r in s.stub.Reindex(req, metadata=s.md(user))]
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        [r async for r in s.stub.Reindex(pb.ReindexRequest(), metadata=s.md())]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.stub.GetIndexStatus(pb.GetIndexStatusRequest(), metadata=s.md(user))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.stub.Search(pb.SearchRequest(parent=f"users/{user}"), metadata=s.md(user)[:0])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    total = await s.stub.GetIndexStatus(pb.GetIndexStatusRequest(), metadata=s.md())
    assert total.documents >= 0 and total.pending_events >= 0
    everyone = [r async for r in s.stub.Reindex(pb.ReindexRequest(all_users=True), metadata=s.md())]
    assert everyone[-1].done and everyone[-1].users_done >= 1


# --- restarts: a mesh of their own ---------------------------------------------------------------

@pytest_asyncio.fixture(loop_scope="function")
async def own_mesh(tmp_path: Path, nats_url: str) -> AsyncIterator[Mesh]:
    mesh = await start_mesh(tmp_path, nats_url)
    try:
        yield mesh
    finally:
        await stop_mesh(mesh)


@pytest.mark.asyncio(loop_scope="function")
async def test_index_survives_restart_and_full_redelivery_is_harmless(own_mesh: Mesh) -> None:
    s = await start_search(own_mesh)
    try:
        user = (await own_mesh.admin_setup("example.com", ("gina",)))["gina"]
        await fill(s, user)
        before = await answers(s, user)
    finally:
        await stop_search(s)
    # while search is down the mailbox keeps changing; then every event is delivered again
    extra = await s.add(user, "Quarterly report late", "late numbers")
    await own_mesh.js.delete_consumer(streams.EVENTS.name, DURABLE)
    s = await start_search(own_mesh)
    try:
        await s.settle(user)
        after = await answers(s, user)
        assert after["label:work"] == before["label:work"]
        assert after["in:trash"] == before["in:trash"]
        assert sorted(after["quarterly"]) == sorted([extra, *before["quarterly"]])
        assert sorted(after["is:unread"]) == sorted([extra, *before["is:unread"]])
        status = await s.stub.GetIndexStatus(pb.GetIndexStatusRequest(parent=f"users/{user}"), metadata=s.md())
        assert status.documents == 9 and status.pending_events == 0
    finally:
        await stop_search(s)


async def test_undecodable_and_refused_events_do_not_stop_indexing(searchmesh: Search,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    s = searchmesh
    user = (await new_users(s, "hank"))["hank"]
    await s.mesh.js.publish(streams.events_subject(user), b"\xff\xfe not a MailboxEvent")
    backend: Backend = s.ctx.components["backend"]
    write = backend.write

    async def refuse_poison(upserts, deletes):  # type: ignore[no-untyped-def]
        if any("POISON" in d.subject for d in upserts):
            raise ValueError("the backend refuses this document")
        await write(upserts, deletes)

    monkeypatch.setattr(backend, "write", refuse_poison)
    bad = await s.add(user, "POISON pill", "never indexed while refused")
    good = await s.add(user, "Healthy", "indexed all the same")
    await s.settle(user)  # the healthy message, after the poison one, is indexed
    await s.expect(user, "healthy", [good])
    await s.expect(user, "pill", [])
    monkeypatch.setattr(backend, "write", write)
    for _ in range(400):  # the refused event is retried (with a delay) and lands once accepted
        if await s.ids(user, "pill"):
            break
        await asyncio.sleep(0.05)
    await s.expect(user, "pill", [bad])


async def test_deleting_an_account_removes_its_documents_through_events(searchmesh: Search) -> None:
    s = searchmesh
    u = await new_users(s, "ivan", "judy")
    ivan, judy = u["ivan"], u["judy"]
    for i in range(3):
        await s.add(ivan, f"Note {i}", "shared words")
        await s.add(judy, f"Note {i}", "shared words")
    await s.settle(ivan, judy)
    assert len(await s.ids(ivan, "note")) == 3
    await s.mesh.stub.DeleteAccount(mpb.DeleteAccountRequest(name=f"users/{ivan}"), metadata=s.md())

    async def ivans_documents() -> int:
        status = await s.stub.GetIndexStatus(pb.GetIndexStatusRequest(parent=f"users/{ivan}"), metadata=s.md())
        return status.documents

    for _ in range(600):  # the account-deleted event travels mailbox → relay → EVENTS → indexer
        if await ivans_documents() == 0:
            break
        await asyncio.sleep(0.05)
    assert await ivans_documents() == 0
    assert await s.ids(ivan, "in:anywhere") == []
    assert len(await s.ids(judy, "note")) == 3  # the other user keeps everything
    # a reindex of a user who no longer exists removes whatever is left of them
    backend: Backend = s.ctx.components["backend"]
    from svc_search.documents import SearchDocument

    await backend.write([SearchDocument(user=ivan, message_id="leftover", subject="note", modseq=1)], [])
    progress = [r async for r in s.stub.Reindex(pb.ReindexRequest(parent=f"users/{ivan}"), metadata=s.md())]
    assert progress[-1].done and progress[-1].removed_documents == 1
    assert await ivans_documents() == 0
