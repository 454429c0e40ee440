"""Wires svc_gateway. Today: the gRPC health endpoint; REST, WebSocket push and IMAP land with
the gateway issues."""

from __future__ import annotations

from mailmesh_common.service import ServiceContext, main


async def register(ctx: ServiceContext) -> None:
    return None


def run() -> None:
    main("svc_gateway", "gateway_port", register)
