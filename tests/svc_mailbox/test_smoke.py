from __future__ import annotations

from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import types_pb2

from tests.svc_mailbox.conftest import Mesh

RAW = b"From: Carol <carol@remote.test>\r\nTo: alice@example.com\r\nSubject: Hello\r\nMessage-ID: <m1@remote.test>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nHi Alice, how are you?\r\n"


async def test_append_then_list(mesh: Mesh, users: dict[str, str]) -> None:
    alice = users["alice"]
    r = await mesh.stub.AppendMessage(pb.AppendMessageRequest(parent=f"users/{alice}", raw=RAW,
                                                              label_ids=["INBOX"], unread=True),
                                      metadata=mesh.md(alice))
    assert r.message.thread_id
    lst = await mesh.stub.ListMessages(pb.ListMessagesRequest(parent="users/me", label_id="INBOX"),
                                       metadata=mesh.md(alice))
    assert [m.subject for m in lst.messages] == ["Hello"]
    labels = await mesh.stub.ListLabels(pb.ListLabelsRequest(parent="users/me"), metadata=mesh.md(alice))
    inbox = next(lb for lb in labels.labels if lb.id == "INBOX")
    assert (inbox.messages_total, inbox.messages_unread) == (1, 1)
    full = await mesh.stub.GetMessage(pb.GetMessageRequest(name=f"users/me/messages/{r.message.id}",
                                                           format=types_pb2.MESSAGE_FORMAT_FULL),
                                      metadata=mesh.md(alice))
    assert "how are you" in full.message.text_body
