"""Two svc_send replicas over one send store (here the embedded SQLite file both open; in
production FoundationDB) share what a user or an operator sees: held sends, idempotency keys
and DKIM keys. A send held by one replica is listed, deduplicated and cancelled by the other."""

from __future__ import annotations

import pytest
from mailmesh.v1 import send_service_pb2 as spb

from tests.svc_send.conftest import REMOTE, SendMesh, auth_md


async def _held(sm: SendMesh, user: str) -> list[str]:
    assert sm.stub is not None
    r = await sm.stub.ListScheduled(spb.ListScheduledRequest(parent="users/me"), metadata=auth_md(user), timeout=20)
    return [s.name for s in r.scheduled_sends]


@pytest.mark.send_settings(undo_send_s=60)
async def test_two_replicas_share_held_sends_idempotency_and_dkim_keys(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    other = SendMesh(sm.tmp, sm.mesh, sm.dns, sm.sink, sm.users)
    await other.start(undo_send_s=60)
    try:
        assert other.send is not sm.send and other.settings is not None and sm.settings is not None
        assert other.settings.send_port != sm.settings.send_port

        r = await sm.send_mail(alice, to=(f"dave@{REMOTE}",), subject="held", idempotency_key="req-7")
        name = f"users/{alice}/messages/{r.message_id}"
        assert await _held(other, alice) == [name], "the other replica sees the held send"
        again = await other.send_mail(alice, to=(f"dave@{REMOTE}",), subject="held", idempotency_key="req-7")
        assert again.message_id == r.message_id, "a retry through the other replica sends nothing new"
        assert len(await sm.label(alice, "SENT")) == 1

        assert other.stub is not None
        cancelled = await other.stub.CancelSend(spb.CancelSendRequest(name=name), metadata=auth_md(alice), timeout=20)
        assert "DRAFTS" in cancelled.message.label_ids
        assert await _held(sm, alice) == [], "cancelled through one replica, gone for both"

        made = await other.send.keys.generate("example.org", "r2", "ed25519")
        [seen] = await sm.send.keys.signing_keys("example.org")
        assert (seen.selector, seen.private_pem) == ("r2", made.private_pem), "one key store for every replica"
    finally:
        await other.stop()
    assert sm.sink.messages == []
