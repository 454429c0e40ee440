"""The gateway's connections: gRPC channels to mailbox, search and send (with the mesh token and
tracing, from mailmesh_common.grpcclient) and its own KV store for bearer tokens."""

from __future__ import annotations

from mailmesh.v1.mailbox_service_pb2_grpc import MailboxServiceStub
from mailmesh.v1.search_service_pb2_grpc import SearchServiceStub
from mailmesh.v1.send_service_pb2_grpc import SendServiceStub
from nats.aio.client import Client as NATS

from mailmesh_common import grpcclient
from mailmesh_common.config import Settings
from mailmesh_common.kv import Database, open_service_database
from svc_gateway.limits import Limits
from svc_gateway.state import GatewayState
from svc_gateway.tokens import TokenStore


def open_gateway_db(settings: Settings) -> Database:
    """gateway.db in the data dir (SQLite), or the shared FoundationDB cluster (`gateway` subspace)."""
    return open_service_database(settings, "gateway.db", "the gateway store")


def connect(settings: Settings, nc: NATS | None) -> GatewayState:
    """A GatewayState with fresh channels (they connect lazily) and the token store."""
    mailbox_ch = grpcclient.channel(settings.addr("mailbox"), settings)
    search_ch = grpcclient.channel(settings.addr("search"), settings)
    send_ch = grpcclient.channel(settings.addr("send"), settings)
    db = open_gateway_db(settings)
    return GatewayState(
        settings=settings,
        mailbox=MailboxServiceStub(mailbox_ch),
        search=SearchServiceStub(search_ch),
        send=SendServiceStub(send_ch),
        tokens=TokenStore(db, settings.gateway_token_ttl_s),
        nats=nc,
        limits=Limits(settings, db),
        db=db,
        channels=[mailbox_ch, search_ch, send_ch],
    )
