"""Wires svc_ingest. Today: the gRPC health endpoint and stream provisioning; the SMTP MX
listener lands with the inbound-mail issue."""

from __future__ import annotations

from mailmesh_common.service import ServiceContext, main


async def register(ctx: ServiceContext) -> None:
    return None


def run() -> None:
    main("svc_ingest", "ingest_port", register)
