"""svc_send's calls to MailboxService. svc_send checks the acting user itself, then calls the
mailbox as the system (no acting user): the mailbox's delivery-status and recipient calls are
administrative. Peer errors come back as MailmeshError (UNAVAILABLE stays temporary)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc
from mailmesh.v1 import types_pb2

from mailmesh_common import auth, grpcclient
from mailmesh_common.config import Settings

T = TypeVar("T")


class MailboxClient:
    def __init__(self, channel: grpc.aio.Channel, settings: Settings) -> None:
        self.channel = channel
        self.stub = pb_grpc.MailboxServiceStub(channel)
        self.timeout_s = settings.grpc_default_deadline_s

    @classmethod
    def connect(cls, settings: Settings) -> MailboxClient:
        return cls(grpcclient.channel(settings.addr("mailbox"), settings), settings)

    async def close(self) -> None:
        await self.channel.close()

    async def _system(self, call: Callable[[], Awaitable[T]]) -> T:
        token = auth.set_acting_user(None)
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            raise grpcclient.translate(exc) from None
        finally:
            auth.reset_acting_user(token)

    async def get_account(self, user: str) -> types_pb2.Account:
        r = await self._system(lambda: self.stub.GetAccount(pb.GetAccountRequest(name=f"users/{user}"),
                                                            timeout=self.timeout_s))
        return r.account

    async def get_message(self, user: str, msg_id: str,
                          fmt: types_pb2.MessageFormat.ValueType = types_pb2.MESSAGE_FORMAT_METADATA
                          ) -> types_pb2.Message:
        r = await self._system(lambda: self.stub.GetMessage(
            pb.GetMessageRequest(name=f"users/{user}/messages/{msg_id}", format=fmt), timeout=self.timeout_s))
        return r.message

    async def append(self, user: str, raw: bytes, labels: list[str], *, unread: bool, idempotency_key: str,
                     track_recipients: Sequence[str] = ()) -> types_pb2.Message:
        req = pb.AppendMessageRequest(parent=f"users/{user}", raw=raw, label_ids=labels, unread=unread,
                                      idempotency_key=idempotency_key, track_recipients=list(track_recipients))
        r = await self._system(lambda: self.stub.AppendMessage(req, timeout=self.timeout_s))
        return r.message

    async def resolve(self, address: str) -> pb.ResolveRecipientResponse:
        return await self._system(lambda: self.stub.ResolveRecipient(
            pb.ResolveRecipientRequest(address=address), timeout=self.timeout_s))

    async def update_status(self, user: str, msg_id: str,
                            recipients: list[types_pb2.RecipientStatus]) -> types_pb2.Message:
        req = pb.UpdateDeliveryStatusRequest(name=f"users/{user}/messages/{msg_id}", recipients=recipients)
        r = await self._system(lambda: self.stub.UpdateDeliveryStatus(req, timeout=self.timeout_s))
        return r.message

    async def move(self, user: str, msg_id: str, add: list[str], remove: list[str]) -> types_pb2.Message:
        req = pb.BatchModifyMessagesRequest(parent=f"users/{user}", ids=[msg_id], add_label_ids=add,
                                            remove_label_ids=remove)
        r = await self._system(lambda: self.stub.BatchModifyMessages(req, timeout=self.timeout_s))
        return r.messages[0]

    async def authenticate(self, email: str, password: str) -> types_pb2.Account:
        r = await self._system(lambda: self.stub.Authenticate(
            pb.AuthenticateRequest(email=email, password=password), timeout=self.timeout_s))
        return r.account


__all__ = ["MailboxClient"]
