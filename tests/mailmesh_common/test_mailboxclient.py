"""mailmesh_common.mailboxclient against a real svc_mailbox over loopback gRPC: a client acting
for the current user (system=False) is checked like that user, a system client is not; errors
come back as MailmeshError; listings, lookups and the export stream work."""

from __future__ import annotations

import pytest
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import types_pb2

from mailmesh_common import auth
from mailmesh_common.errors import NotFound, PermissionDenied, Unauthenticated
from mailmesh_common.mailboxclient import MailboxClient
from tests.svc_mailbox.conftest import Mesh, mesh, nats_url  # noqa: F401 (fixtures)

RAW = b"From: Carol <carol@remote.test>\r\nTo: bob@example.com\r\nSubject: for bob\r\n\r\nhello bob\r\n"


async def test_acting_user_or_system_errors_and_listings(mesh: Mesh) -> None:  # noqa: F811
    ids = await mesh.admin_setup("example.com", ("alice", "bob"))
    alice, bob = ids["alice"], ids["bob"]
    system = MailboxClient.connect(mesh.settings, system=True)
    for_user = MailboxClient.connect(mesh.settings)
    try:
        msg = await system.append(bob, RAW, ["INBOX"], unread=True, idempotency_key="t1")
        assert (await system.append(bob, RAW, ["INBOX"], unread=True, idempotency_key="t1")).id == msg.id

        token = auth.set_acting_user(alice)  # as if serving alice's RPC
        try:
            with pytest.raises(PermissionDenied):
                await for_user.get_message(bob, msg.id)
            got = await system.get_message(bob, msg.id)  # the system client ignores the context
            assert got.subject == "for bob"
        finally:
            auth.reset_acting_user(token)

        token = auth.set_acting_user(bob)
        try:
            assert (await for_user.get_message(bob, msg.id)).subject == "for bob"
            assert await for_user.find_message(bob, "no-such-id") is None
            with pytest.raises(NotFound):
                await for_user.get_message(bob, "no-such-id")
            assert {"INBOX", "SENT"} <= {lab.id for lab in await for_user.list_labels(bob)}
        finally:
            auth.reset_acting_user(token)

        assert (await system.get_account(alice)).email == "alice@example.com"
        assert set(ids.values()) <= set(await system.user_ids(page_size=1))
        res = await system.resolve("nobody@example.com")
        assert res.resolution == mpb.RECIPIENT_RESOLUTION_UNKNOWN_USER
        assert (await system.resolve("x@remote.test")).resolution == mpb.RECIPIENT_RESOLUTION_FOREIGN_DOMAIN
        with pytest.raises(Unauthenticated):
            await system.authenticate("alice@example.com", "wrong password")
        assert (await system.authenticate("alice@example.com", "correct horse battery")).user_id == alice

        [moved] = await system.modify(bob, [msg.id], add=["STARRED"], remove=["INBOX"])
        assert "STARRED" in moved.label_ids and "INBOX" not in moved.label_ids
        exported = [(m.id, raw) async for m, raw in system.export(bob)]
        assert exported == [(msg.id, RAW)]
        full = await system.get_message(bob, msg.id, types_pb2.MESSAGE_FORMAT_RAW)
        assert full.raw == RAW
    finally:
        await system.close()
        await for_user.close()
