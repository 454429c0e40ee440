"""MailboxService over gRPC: resource names and request validation in, protobuf out. The
business logic lives in mailbox.py and the modules it calls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc

from mailmesh_common.auth import acting_user, check_user, split_name, user_from_parent
from mailmesh_common.errors import InvalidInput, PermissionDenied
from svc_mailbox.mailbox import Mailbox
from svc_mailbox.messages import timestamp_us

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def system_only(what: str) -> None:
    """Administrative and mesh-internal calls may not be made on behalf of a user."""
    if acting_user() is not None:
        raise PermissionDenied(f"{what} is an administrative call")


class MailboxServicer(pb_grpc.MailboxServiceServicer):
    def __init__(self, mailbox: Mailbox) -> None:
        self.mb = mailbox

    # --- domains and accounts
    async def CreateDomain(self, request: pb.CreateDomainRequest, context: Ctx) -> pb.CreateDomainResponse:
        system_only("CreateDomain")
        return pb.CreateDomainResponse(domain=await self.mb.create_domain(request.name))

    async def ListDomains(self, request: pb.ListDomainsRequest, context: Ctx) -> pb.ListDomainsResponse:
        system_only("ListDomains")
        items, token = await self.mb.list_domains(request.page_size, request.page_token)
        return pb.ListDomainsResponse(domains=items, next_page_token=token)

    async def CreateAccount(self, request: pb.CreateAccountRequest, context: Ctx) -> pb.CreateAccountResponse:
        system_only("CreateAccount")
        return pb.CreateAccountResponse(account=await self.mb.create_account(request))

    async def ListAccounts(self, request: pb.ListAccountsRequest, context: Ctx) -> pb.ListAccountsResponse:
        system_only("ListAccounts")
        items, token = await self.mb.list_accounts(request.domain, request.page_size, request.page_token)
        return pb.ListAccountsResponse(accounts=items, next_page_token=token)

    async def DeleteAccount(self, request: pb.DeleteAccountRequest, context: Ctx) -> pb.DeleteAccountResponse:
        system_only("DeleteAccount")
        user = user_from_parent(request.name, field="name")
        return pb.DeleteAccountResponse(deleted_messages=await self.mb.delete_account(user))

    async def RecountMailbox(self, request: pb.RecountMailboxRequest, context: Ctx) -> pb.RecountMailboxResponse:
        system_only("RecountMailbox")
        labels, account = await self.mb.recount(user_from_parent(request.name, field="name"))
        return pb.RecountMailboxResponse(labels=labels, account=account)

    async def ExportMessages(self, request: pb.ExportMessagesRequest,
                             context: Ctx) -> AsyncIterator[pb.ExportMessagesResponse]:
        user = user_from_parent(request.parent)
        async for item in self.mb.export(user, request.label_id, request.page_token):
            yield item

    async def GetAccount(self, request: pb.GetAccountRequest, context: Ctx) -> pb.GetAccountResponse:
        if request.name and request.email:
            raise InvalidInput("give name or email, not both")
        if request.email:
            user = check_user(await self.mb.user_for_email(request.email))
        else:
            user = user_from_parent(request.name, field="name")
        return pb.GetAccountResponse(account=await self.mb.get_account(user))

    async def SetPassword(self, request: pb.SetPasswordRequest, context: Ctx) -> pb.SetPasswordResponse:
        await self.mb.set_password(user_from_parent(request.name, field="name"), request.password)
        return pb.SetPasswordResponse()

    async def Authenticate(self, request: pb.AuthenticateRequest, context: Ctx) -> pb.AuthenticateResponse:
        system_only("Authenticate")
        if len(request.email) > 512 or len(request.password) > 1024:
            raise InvalidInput("email or password too long")
        return pb.AuthenticateResponse(account=await self.mb.authenticate(request.email, request.password))

    async def ResolveRecipient(self, request: pb.ResolveRecipientRequest, context: Ctx) -> pb.ResolveRecipientResponse:
        system_only("ResolveRecipient")
        return await self.mb.resolve_recipient(request.address, request.message_size)

    # --- adding mail
    async def DeliverMessage(self, request: pb.DeliverMessageRequest, context: Ctx) -> pb.DeliverMessageResponse:
        system_only("DeliverMessage")
        user = user_from_parent(request.parent)
        received = (timestamp_us(request.received_time, "received_time")
                    if request.HasField("received_time") else 0)
        msg, dup = await self.mb.deliver(user, request.ingest_id, request.blob_ref, request.target,
                                         request.spam_score, received)
        return pb.DeliverMessageResponse(message=msg, duplicate=dup)

    async def AppendMessage(self, request: pb.AppendMessageRequest, context: Ctx) -> pb.AppendMessageResponse:
        user = user_from_parent(request.parent)
        return pb.AppendMessageResponse(message=await self.mb.append(user, request))

    # --- labels
    async def ListLabels(self, request: pb.ListLabelsRequest, context: Ctx) -> pb.ListLabelsResponse:
        return pb.ListLabelsResponse(labels=await self.mb.list_labels(user_from_parent(request.parent)))

    async def GetLabel(self, request: pb.GetLabelRequest, context: Ctx) -> pb.GetLabelResponse:
        user, label_id = split_name(request.name, "labels")
        return pb.GetLabelResponse(label=await self.mb.get_label(user, label_id))

    async def CreateLabel(self, request: pb.CreateLabelRequest, context: Ctx) -> pb.CreateLabelResponse:
        label = await self.mb.create_label(user_from_parent(request.parent), request.name)
        return pb.CreateLabelResponse(label=label)

    async def UpdateLabel(self, request: pb.UpdateLabelRequest, context: Ctx) -> pb.UpdateLabelResponse:
        user, label_id = split_name(request.name, "labels")
        paths = list(request.update_mask.paths) or ["name"]
        if paths != ["name"]:
            raise InvalidInput("update_mask: only 'name' can be updated")
        label = await self.mb.rename_label(user, label_id, request.label.name)
        return pb.UpdateLabelResponse(label=label)

    async def DeleteLabel(self, request: pb.DeleteLabelRequest, context: Ctx) -> pb.DeleteLabelResponse:
        user, label_id = split_name(request.name, "labels")
        await self.mb.delete_label(user, label_id)
        return pb.DeleteLabelResponse()

    # --- reading
    async def ListMessages(self, request: pb.ListMessagesRequest, context: Ctx) -> pb.ListMessagesResponse:
        return await self.mb.list_messages(user_from_parent(request.parent), request)

    async def ListThreads(self, request: pb.ListThreadsRequest, context: Ctx) -> pb.ListThreadsResponse:
        return await self.mb.list_threads(user_from_parent(request.parent), request)

    async def GetMessage(self, request: pb.GetMessageRequest, context: Ctx) -> pb.GetMessageResponse:
        user, msg_id = split_name(request.name, "messages")
        return pb.GetMessageResponse(message=await self.mb.get_message(user, msg_id, request.format))

    async def GetAttachment(self, request: pb.GetAttachmentRequest,
                            context: Ctx) -> AsyncIterator[pb.GetAttachmentResponse]:
        user, msg_id = split_name(request.message, "messages", field="message")
        async for chunk in self.mb.attachment(user, msg_id, request.attachment_id):
            yield chunk

    async def GetThread(self, request: pb.GetThreadRequest, context: Ctx) -> pb.GetThreadResponse:
        user, thread_id = split_name(request.name, "threads")
        return pb.GetThreadResponse(thread=await self.mb.get_thread(user, thread_id, request.format))

    # --- changing
    async def BatchModifyMessages(self, request: pb.BatchModifyMessagesRequest,
                                  context: Ctx) -> pb.BatchModifyMessagesResponse:
        return await self.mb.batch_modify(user_from_parent(request.parent), request)

    async def TrashMessage(self, request: pb.TrashMessageRequest, context: Ctx) -> pb.TrashMessageResponse:
        user, msg_id = split_name(request.name, "messages")
        return pb.TrashMessageResponse(message=await self.mb.trash(user, msg_id))

    async def UntrashMessage(self, request: pb.UntrashMessageRequest, context: Ctx) -> pb.UntrashMessageResponse:
        user, msg_id = split_name(request.name, "messages")
        return pb.UntrashMessageResponse(message=await self.mb.untrash(user, msg_id))

    async def DeleteMessage(self, request: pb.DeleteMessageRequest, context: Ctx) -> pb.DeleteMessageResponse:
        user, msg_id = split_name(request.name, "messages")
        await self.mb.delete(user, msg_id)
        return pb.DeleteMessageResponse()

    async def EmptyLabel(self, request: pb.EmptyLabelRequest, context: Ctx) -> pb.EmptyLabelResponse:
        user, label_id = split_name(request.name, "labels")
        return pb.EmptyLabelResponse(deleted_count=await self.mb.empty_label(user, label_id))

    async def UpdateDeliveryStatus(self, request: pb.UpdateDeliveryStatusRequest,
                                   context: Ctx) -> pb.UpdateDeliveryStatusResponse:
        system_only("UpdateDeliveryStatus")
        user, msg_id = split_name(request.name, "messages")
        msg = await self.mb.update_delivery_status(user, msg_id, list(request.recipients))
        return pb.UpdateDeliveryStatusResponse(message=msg)

    # --- changes and IMAP helpers
    async def ListChanges(self, request: pb.ListChangesRequest, context: Ctx) -> pb.ListChangesResponse:
        return await self.mb.list_changes(user_from_parent(request.parent), request.since_modseq,
                                          request.page_size)

    async def WatchChanges(self, request: pb.WatchChangesRequest,
                           context: Ctx) -> AsyncIterator[pb.WatchChangesResponse]:
        user = user_from_parent(request.parent)
        async for change in self.mb.watch(user, request.since_modseq):
            yield pb.WatchChangesResponse(change=change)

    async def ListLabelUids(self, request: pb.ListLabelUidsRequest, context: Ctx) -> pb.ListLabelUidsResponse:
        user, label_id = split_name(request.name, "labels")
        return await self.mb.list_label_uids(user, request, label_id)


def service_name() -> Any:
    return pb.DESCRIPTOR.services_by_name["MailboxService"].full_name
