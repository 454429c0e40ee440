"""Wires svc_mailbox (placeholder until the mailbox store lands)."""

from __future__ import annotations

from mailmesh_common.service import ServiceContext, main


async def register(ctx: ServiceContext) -> None:
    return None


def run() -> None:
    main("svc_mailbox", "mailbox_port", register)
