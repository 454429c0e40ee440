"""A typed client of MailboxService for the other services of the mesh.

One channel (mailmesh_common.grpcclient: tracing, the mesh token, the acting user), one deadline
per call, and errors turned back into the MailmeshError family (`grpcclient.translate`: NOT_FOUND
is NotFound, UNAVAILABLE stays temporary so that consumers retry).

Who a call acts for is the client's choice, made once:
- `system=False` (default): a call made while serving a user's RPC carries that user (the acting
  user of the current context, added by the channel's interceptor); outside an RPC (a consumer,
  a job) it is a system call. What svc_search wants.
- `system=True`: every call is a system call, whatever the context. For services that check the
  acting user themselves and then use the mailbox's administrative calls (svc_send: recipient
  resolution, delivery status, DSNs in the sender's INBOX).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc
from mailmesh.v1 import types_pb2

from mailmesh_common import auth, grpcclient
from mailmesh_common.config import Settings
from mailmesh_common.errors import NotFound

T = TypeVar("T")

EXPORT_TIMEOUT_S = 24 * 3600.0
MAX_PAGES = 100_000  # bound on the pages one listing follows


class MailboxClient:
    """MailboxService calls returning protobuf messages; failures raise MailmeshError."""

    def __init__(self, channel: grpc.aio.Channel, settings: Settings, *, system: bool = False,
                 timeout_s: float | None = None) -> None:
        self.channel = channel
        self.stub = pb_grpc.MailboxServiceStub(channel)
        self.system = system
        self.timeout_s = timeout_s if timeout_s is not None else settings.grpc_default_deadline_s

    @classmethod
    def connect(cls, settings: Settings, *, system: bool = False, timeout_s: float | None = None) -> MailboxClient:
        """A client on a new channel to the mailbox service named by the settings."""
        return cls(grpcclient.channel(settings.addr("mailbox"), settings), settings, system=system,
                   timeout_s=timeout_s)

    async def close(self) -> None:
        await self.channel.close()

    # --- the plumbing -------------------------------------------------------------------------------
    async def call(self, rpc: Callable[[], Awaitable[T]]) -> T:
        """Runs one unary call (a closure over the stub) as this client acts; errors translated."""
        token = auth.set_acting_user(None) if self.system else None
        try:
            return await rpc()
        except grpc.aio.AioRpcError as exc:
            raise grpcclient.translate(exc) from None
        finally:
            if token is not None:
                auth.reset_acting_user(token)

    def _t(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    # --- accounts -----------------------------------------------------------------------------------
    async def get_account(self, user: str, *, timeout_s: float | None = None) -> types_pb2.Account:
        r = await self.call(lambda: self.stub.GetAccount(pb.GetAccountRequest(name=f"users/{user}"),
                                                         timeout=self._t(timeout_s)))
        return r.account

    async def authenticate(self, email: str, password: str) -> types_pb2.Account:
        """The account of valid credentials; Unauthenticated otherwise."""
        r = await self.call(lambda: self.stub.Authenticate(
            pb.AuthenticateRequest(email=email, password=password), timeout=self.timeout_s))
        return r.account

    async def user_ids(self, *, page_size: int = 1000) -> list[str]:
        """Every user id of the mailbox (an administrative call)."""
        out: list[str] = []
        token = ""
        for _ in range(MAX_PAGES):
            r = await self.call(lambda t=token: self.stub.ListAccounts(  # type: ignore[misc]
                pb.ListAccountsRequest(page_size=page_size, page_token=t), timeout=self.timeout_s))
            out.extend(a.user_id for a in r.accounts)
            token = r.next_page_token
            if not token:
                break
        return out

    async def resolve(self, address: str) -> pb.ResolveRecipientResponse:
        """What happens to mail for an address (local user, unknown user, foreign domain...)."""
        return await self.call(lambda: self.stub.ResolveRecipient(
            pb.ResolveRecipientRequest(address=address), timeout=self.timeout_s))

    # --- messages -----------------------------------------------------------------------------------
    async def get_message(self, user: str, msg_id: str,
                          fmt: types_pb2.MessageFormat.ValueType = types_pb2.MESSAGE_FORMAT_METADATA, *,
                          timeout_s: float | None = None) -> types_pb2.Message:
        """One message; NotFound when it does not exist."""
        r = await self.call(lambda: self.stub.GetMessage(
            pb.GetMessageRequest(name=f"users/{user}/messages/{msg_id}", format=fmt), timeout=self._t(timeout_s)))
        return r.message

    async def find_message(self, user: str, msg_id: str,
                           fmt: types_pb2.MessageFormat.ValueType = types_pb2.MESSAGE_FORMAT_METADATA, *,
                           timeout_s: float | None = None) -> types_pb2.Message | None:
        """One message, or None when it no longer exists."""
        try:
            return await self.get_message(user, msg_id, fmt, timeout_s=timeout_s)
        except NotFound:
            return None

    async def append(self, user: str, raw: bytes, labels: Sequence[str], *, unread: bool, idempotency_key: str = "",
                     track_recipients: Sequence[str] = ()) -> types_pb2.Message:
        """Stores a message in the user's mailbox (idempotent on idempotency_key)."""
        req = pb.AppendMessageRequest(parent=f"users/{user}", raw=raw, label_ids=list(labels), unread=unread,
                                      idempotency_key=idempotency_key, track_recipients=list(track_recipients))
        r = await self.call(lambda: self.stub.AppendMessage(req, timeout=self.timeout_s))
        return r.message

    async def modify(self, user: str, ids: Sequence[str], add: Sequence[str] = (),
                     remove: Sequence[str] = ()) -> list[types_pb2.Message]:
        """Adds and removes labels on messages of the user."""
        req = pb.BatchModifyMessagesRequest(parent=f"users/{user}", ids=list(ids), add_label_ids=list(add),
                                            remove_label_ids=list(remove))
        r = await self.call(lambda: self.stub.BatchModifyMessages(req, timeout=self.timeout_s))
        return list(r.messages)

    async def update_status(self, user: str, msg_id: str,
                            recipients: Sequence[types_pb2.RecipientStatus]) -> types_pb2.Message:
        """Records delivery states of recipients on a sent message."""
        req = pb.UpdateDeliveryStatusRequest(name=f"users/{user}/messages/{msg_id}", recipients=list(recipients))
        r = await self.call(lambda: self.stub.UpdateDeliveryStatus(req, timeout=self.timeout_s))
        return r.message

    # --- labels and export --------------------------------------------------------------------------
    async def list_labels(self, user: str, *, timeout_s: float | None = None) -> list[types_pb2.Label]:
        r = await self.call(lambda: self.stub.ListLabels(pb.ListLabelsRequest(parent=f"users/{user}"),
                                                         timeout=self._t(timeout_s)))
        return list(r.labels)

    async def export(self, user: str, *, timeout_s: float = EXPORT_TIMEOUT_S
                     ) -> AsyncIterator[tuple[types_pb2.Message, bytes]]:
        """Every message of the user (SPAM and TRASH included) with its raw bytes."""
        token = auth.set_acting_user(None) if self.system else None
        try:
            stream = self.stub.ExportMessages(pb.ExportMessagesRequest(parent=f"users/{user}"), timeout=timeout_s)
        finally:
            if token is not None:
                auth.reset_acting_user(token)
        try:
            async for item in stream:
                yield item.message, item.raw
        except grpc.aio.AioRpcError as exc:
            raise grpcclient.translate(exc) from None


__all__ = ["MailboxClient"]
