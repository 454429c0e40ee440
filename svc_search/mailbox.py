"""What svc_search asks the mailbox service, over gRPC with the mesh token: messages in FULL
format (indexing), labels and addresses (resolving label: and from:me), accounts and exports
(reindexing). Calls made while serving a user's RPC carry that user; the indexer's are system
calls. NOT_FOUND becomes None; everything else becomes the matching MailmeshError
(UNAVAILABLE stays temporary, so the indexer retries later)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import mailbox_service_pb2_grpc as mpb_grpc
from mailmesh.v1 import types_pb2

from mailmesh_common import auth, grpcclient
from mailmesh_common.config import Settings

CALL_TIMEOUT_S = 15.0
EXPORT_TIMEOUT_S = 24 * 3600.0


class MailboxClient:
    def __init__(self, settings: Settings) -> None:
        self.channel = grpcclient.channel(settings.addr("mailbox"), settings)
        # grpcclient's metadata interceptor is registered for unary calls only (grpc.aio files an
        # interceptor under its first matching kind): streaming calls name the token themselves
        self.stream_md = ((auth.TOKEN_KEY, settings.token()),)
        self.stub = mpb_grpc.MailboxServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def get_message(self, user: str, message_id: str, deadline_s: float = CALL_TIMEOUT_S) -> types_pb2.Message | None:
        """The message in FULL format, or None when it no longer exists."""
        try:
            r = await self.stub.GetMessage(mpb.GetMessageRequest(
                name=f"users/{user}/messages/{message_id}", format=types_pb2.MESSAGE_FORMAT_FULL), timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise grpcclient.translate(exc) from exc
        return r.message

    async def labels(self, user: str, deadline_s: float = CALL_TIMEOUT_S) -> list[tuple[str, str]]:
        """(id, name) of every label of the user."""
        try:
            r = await self.stub.ListLabels(mpb.ListLabelsRequest(parent=f"users/{user}"), timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            raise grpcclient.translate(exc) from exc
        return [(lab.id, lab.name) for lab in r.labels]

    async def account(self, user: str, deadline_s: float = CALL_TIMEOUT_S) -> types_pb2.Account:
        try:
            r = await self.stub.GetAccount(mpb.GetAccountRequest(name=f"users/{user}"), timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            raise grpcclient.translate(exc) from exc
        return r.account

    async def users(self) -> list[str]:
        """Every user id of the mailbox (a system call)."""
        out: list[str] = []
        token = ""
        while True:
            try:
                r = await self.stub.ListAccounts(mpb.ListAccountsRequest(page_size=1000, page_token=token),
                                                 timeout=CALL_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                raise grpcclient.translate(exc) from exc
            out.extend(a.user_id for a in r.accounts)
            token = r.next_page_token
            if not token:
                return out

    async def export(self, user: str) -> AsyncIterator[tuple[types_pb2.Message, bytes]]:
        """Every message of the user (SPAM and TRASH included) with its raw bytes."""
        call = self.stub.ExportMessages(mpb.ExportMessagesRequest(parent=f"users/{user}"), timeout=EXPORT_TIMEOUT_S,
                                        metadata=self.stream_md)
        try:
            async for item in call:
                yield item.message, item.raw
        except grpc.aio.AioRpcError as exc:
            raise grpcclient.translate(exc) from exc
