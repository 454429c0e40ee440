"""What one gateway process shares between requests: settings, the mesh stubs, the token store,
the NATS connection (used by push) and the rate limits. The FastAPI app keeps it as `app.state.gw`."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from mailmesh.v1.mailbox_service_pb2_grpc import MailboxServiceStub
from mailmesh.v1.search_service_pb2_grpc import SearchServiceStub
from mailmesh.v1.send_service_pb2_grpc import SendServiceStub
from nats.aio.client import Client as NATS

from mailmesh_common.config import Settings
from mailmesh_common.kv import Database
from svc_gateway.limits import Limits
from svc_gateway.tokens import TokenStore


@dataclass
class GatewayState:
    settings: Settings
    mailbox: MailboxServiceStub
    search: SearchServiceStub
    send: SendServiceStub
    tokens: TokenStore
    nats: NATS | None
    limits: Limits
    db: Database | None = None
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()
        if self.db is not None:
            await self.db.close()
