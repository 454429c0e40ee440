"""Wires svc_send. Today: the gRPC health endpoint and stream provisioning; composing,
delivery and SMTP submission land with the sending issue."""

from __future__ import annotations

from mailmesh_common.service import ServiceContext, main


async def register(ctx: ServiceContext) -> None:
    return None


def run() -> None:
    main("svc_send", "send_port", register)
