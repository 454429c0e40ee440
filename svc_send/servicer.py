"""SendService over gRPC: resource names and the acting user in, protobuf out. The pipeline
lives in outbound.py, the queue in queue.py and delivery.py."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import send_service_pb2_grpc as spb_grpc

from mailmesh_common.auth import acting_user, split_name, user_from_parent
from mailmesh_common.errors import PermissionDenied
from svc_send.delivery import Delivery
from svc_send.outbound import Outbox
from svc_send.queue import QueueStore, job_of
from svc_send.schedule import HeldSends

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def system_only(what: str) -> None:
    """The queue is the operator's: not reachable on behalf of a user."""
    if acting_user() is not None:
        raise PermissionDenied(f"{what} is an administrative call")


class SendServicer(spb_grpc.SendServiceServicer):
    def __init__(self, outbox: Outbox, held: HeldSends, queue: QueueStore, delivery: Delivery) -> None:
        self.outbox = outbox
        self.held = held
        self.queue = queue
        self.delivery = delivery

    async def Send(self, request: spb.SendRequest, context: Ctx) -> spb.SendResponse:
        accepted = await self.outbox.send(user_from_parent(request.parent), request)
        s = accepted.send.send
        return spb.SendResponse(message=accepted.message, message_id=accepted.send.message_id,
                                thread_id=s.thread_id, status=s.status, send_time=s.send_time)

    async def CancelSend(self, request: spb.CancelSendRequest, context: Ctx) -> spb.CancelSendResponse:
        user, msg_id = split_name(request.name, "messages")
        return spb.CancelSendResponse(message=await self.outbox.cancel(user, msg_id))

    async def ListScheduled(self, request: spb.ListScheduledRequest, context: Ctx) -> spb.ListScheduledResponse:
        items, token = await self.held.list_held(user_from_parent(request.parent), request.page_size,
                                                 request.page_token)
        return spb.ListScheduledResponse(scheduled_sends=items, next_page_token=token)

    async def ListQueue(self, request: spb.ListQueueRequest, context: Ctx) -> spb.ListQueueResponse:
        system_only("ListQueue")
        items, token = await self.queue.list_active(request.domain, request.page_size, request.page_token)
        return spb.ListQueueResponse(entries=items, next_page_token=token)

    async def GetQueueEntry(self, request: spb.GetQueueEntryRequest, context: Ctx) -> spb.GetQueueEntryResponse:
        system_only("GetQueueEntry")
        return spb.GetQueueEntryResponse(entry=await self.queue.get(job_of(request.name)))

    async def RetryQueueEntry(self, request: spb.RetryQueueEntryRequest,
                              context: Ctx) -> spb.RetryQueueEntryResponse:
        system_only("RetryQueueEntry")
        return spb.RetryQueueEntryResponse(entry=await self.delivery.retry(job_of(request.name)))

    async def CancelQueueEntry(self, request: spb.CancelQueueEntryRequest,
                               context: Ctx) -> spb.CancelQueueEntryResponse:
        system_only("CancelQueueEntry")
        return spb.CancelQueueEntryResponse(entry=await self.delivery.cancel(job_of(request.name)))


def service_name() -> Any:
    return spb.DESCRIPTOR.services_by_name["SendService"].full_name


__all__ = ["SendServicer", "service_name"]
