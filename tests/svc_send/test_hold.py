"""Undo send and scheduled send: a held message can be cancelled (it moves to DRAFTS and
nothing is delivered) until its time; after that CancelSend answers FAILED_PRECONDITION.
Held sends survive a restart of every process (nats-server, svc_mailbox, svc_send)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import types_pb2

from mailmesh_common.natsserver import NatsServer
from tests.dnsserver import DnsServer
from tests.svc_mailbox.conftest import free_port, start_mesh, stop_mesh
from tests.svc_send.conftest import REMOTE, SendMesh, auth_md, close_send_mesh, make_send_mesh, wait_for


def _at(seconds_from_now: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int((time.time() + seconds_from_now) * 1e9))
    return t


async def _cancel(sm: SendMesh, user: str, msg_id: str) -> spb.CancelSendResponse:
    assert sm.stub is not None
    return await sm.stub.CancelSend(spb.CancelSendRequest(name=f"users/{user}/messages/{msg_id}"),  # type: ignore[no-any-return]
                                    metadata=auth_md(user), timeout=20)


async def _scheduled(sm: SendMesh, user: str) -> list[spb.ScheduledSend]:
    assert sm.stub is not None
    r = await sm.stub.ListScheduled(spb.ListScheduledRequest(parent="users/me"), metadata=auth_md(user), timeout=20)
    return list(r.scheduled_sends)


async def _in_inbox(sm: SendMesh, user: str, subject: str) -> bool:
    return any(m.subject == subject for m in await sm.label(user, "INBOX"))


@pytest.mark.send_settings(undo_send_s=2.5)
async def test_undo_inside_the_window_moves_to_drafts_and_delivers_nothing(sm: SendMesh) -> None:
    alice, bob = sm.users["alice"], sm.users["bob"]
    r = await sm.send_mail(alice, to=(f"dave@{REMOTE}", "bob@example.com"), subject="oops")
    assert r.status == spb.SEND_STATUS_QUEUED
    assert r.send_time.ToNanoseconds() > time.time_ns()
    [held] = await _scheduled(sm, alice)
    assert held.name == f"users/{alice}/messages/{r.message_id}" and held.status == spb.SEND_STATUS_QUEUED
    assert sorted(held.recipients) == ["bob@example.com", f"dave@{REMOTE}"]
    cancelled = (await _cancel(sm, alice, r.message_id)).message
    assert "DRAFTS" in cancelled.label_ids and "SENT" not in cancelled.label_ids
    assert await _scheduled(sm, alice) == []
    again = (await _cancel(sm, alice, r.message_id)).message  # repeating a cancel is harmless
    assert "DRAFTS" in again.label_ids
    # past the window: nothing went anywhere
    await asyncio.sleep(max(0.0, r.send_time.ToNanoseconds() / 1e9 - time.time()) + 0.5)
    assert sm.sink.connections == 0 and sm.sink.messages == []
    assert not await _in_inbox(sm, bob, "oops")
    assert [m.id for m in await sm.label(alice, "DRAFTS")] == [r.message_id]
    assert await sm.label(alice, "SENT") == []


@pytest.mark.send_settings(undo_send_s=0.5)
async def test_undo_after_the_window_is_refused(sm: SendMesh) -> None:
    alice, bob = sm.users["alice"], sm.users["bob"]
    r = await sm.send_mail(alice, to=(f"dave@{REMOTE}",), subject="final")
    await wait_for(lambda: _delivered(sm), "the delivery after the window")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _cancel(sm, alice, r.message_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no longer be cancelled" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _cancel(sm, alice, "nosuchmessage")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert sm.stub is not None
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sm.stub.CancelSend(spb.CancelSendRequest(name=f"users/{alice}/messages/{r.message_id}"),
                                 metadata=auth_md(bob), timeout=20)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "SENT" in (await sm.message(alice, r.message_id)).label_ids


async def _delivered(sm: SendMesh) -> bool:
    return bool(sm.sink.messages)


async def test_scheduled_send_can_be_listed_and_cancelled(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    r = await sm.send_mail(alice, to=(f"dave@{REMOTE}",), subject="later", send_time=_at(3600))
    assert r.status == spb.SEND_STATUS_SCHEDULED
    [held] = await _scheduled(sm, alice)
    assert held.status == spb.SEND_STATUS_SCHEDULED and held.subject == "later"
    assert abs(held.send_time.seconds - r.send_time.seconds) <= 1
    later = [await sm.send_mail(alice, to=(f"dave@{REMOTE}",), subject=f"later {i}", send_time=_at(7200 + i))
             for i in range(2)]
    assert sm.stub is not None
    page1 = await sm.stub.ListScheduled(spb.ListScheduledRequest(parent="users/me", page_size=2),
                                        metadata=auth_md(alice), timeout=20)
    page2 = await sm.stub.ListScheduled(spb.ListScheduledRequest(parent="users/me", page_size=2,
                                                                 page_token=page1.next_page_token),
                                        metadata=auth_md(alice), timeout=20)
    assert [s.subject for s in (*page1.scheduled_sends, *page2.scheduled_sends)] == ["later", "later 0", "later 1"]
    assert page1.next_page_token and not page2.next_page_token
    # a tampered token, or alice's token presented by bob, is refused, never followed
    bob = sm.users["bob"]
    tampered = page1.next_page_token[:-2] + ("AA" if not page1.next_page_token.endswith("AA") else "BB")
    for user, token in ((alice, tampered), (bob, page1.next_page_token)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await sm.stub.ListScheduled(spb.ListScheduledRequest(parent="users/me", page_token=token),
                                        metadata=auth_md(user), timeout=20)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for x in (r, *later):
        cancelled = (await _cancel(sm, alice, x.message_id)).message
        assert "DRAFTS" in cancelled.label_ids
    assert await _scheduled(sm, alice) == []


async def test_scheduled_send_survives_a_restart_of_every_process(tmp_path: Path, dns_server: DnsServer) -> None:
    nats = NatsServer(tmp_path / "nats", "127.0.0.1", free_port())
    url = nats.start_and_wait(timeout_s=20)
    sm = await make_send_mesh(tmp_path, url, dns_server)
    try:
        alice, bob = sm.users["alice"], sm.users["bob"]
        r = await sm.send_mail(alice, to=(f"dave@{REMOTE}", "bob@example.com"), subject="at dawn",
                               send_time=_at(3))
        assert r.status == spb.SEND_STATUS_SCHEDULED
        due = r.send_time.ToNanoseconds() / 1e9
        # everything goes down before the time comes, and comes back after it
        await sm.stop()
        assert time.time() < due, "svc_send stopped before the scheduled time"
        await stop_mesh(sm.mesh)
        nats.stop(timeout_s=10)
        await asyncio.sleep(max(0.0, due - time.time()) + 0.5)
        assert sm.sink.messages == []
        nats.start_and_wait(timeout_s=20)
        sm.mesh = await start_mesh(tmp_path, url)
        await sm.start()
        await wait_for(lambda: _delivered(sm), "the scheduled message at the remote server")
        await wait_for(lambda: _in_inbox(sm, bob, "at dawn"), "the scheduled message in bob's INBOX")
        assert len(sm.sink.messages) == 1
        assert await _scheduled(sm, alice) == []
        states = await sm.states(alice, r.message_id)
        assert states["bob@example.com"] == types_pb2.RECIPIENT_STATE_DELIVERED
        await wait_for(lambda: _remote_delivered(sm, alice, r.message_id), "dave DELIVERED on the SENT copy")
    finally:
        await close_send_mesh(sm)
        nats.stop(timeout_s=10)


async def _remote_delivered(sm: SendMesh, user: str, msg_id: str) -> bool:
    return (await sm.states(user, msg_id)).get(f"dave@{REMOTE}") == types_pb2.RECIPIENT_STATE_DELIVERED
