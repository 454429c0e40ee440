"""gRPC channels between services: tracing, the mesh token, the acting user, and timeouts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from mailmesh_common import auth, telemetry
from mailmesh_common.config import Settings
from mailmesh_common.errors import MailmeshError, from_grpc


def _with_mesh_metadata(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    """Adds the mesh token, and the acting user of the current call when there is one."""
    md = list(details.metadata or ())
    keys = {k for k, _ in md}
    if auth.TOKEN_KEY not in keys:
        md.append((auth.TOKEN_KEY, token))
    user = auth.acting_user()
    if user and auth.USER_KEY not in keys:
        md.append((auth.USER_KEY, user))
    return grpc.aio.ClientCallDetails(details.method, details.timeout, grpc.aio.Metadata(*md),
                                      details.credentials, details.wait_for_ready)


# grpc.aio files an interceptor under one kind only, so unary and streaming calls get one each.
class _UnaryMeshMetadata(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_mesh_metadata(details, self.token), request)


class _StreamMeshMetadata(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_mesh_metadata(details, self.token), request)


def channel(target: str, settings: Settings) -> grpc.aio.Channel:
    """An aio channel to another service of the mesh."""
    return grpc.aio.insecure_channel(
        target,
        interceptors=[*telemetry.grpc_client_interceptors(), _UnaryMeshMetadata(settings.token()),
                      _StreamMeshMetadata(settings.token())],
        options=[("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
                 ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
                 ("grpc.keepalive_time_ms", 30_000),
                 ("grpc.enable_retries", 1)],
    )


def as_user(user: str | None) -> Sequence[tuple[str, str]]:
    """Metadata naming an acting user explicitly (for callers outside an RPC, e.g. the gateway)."""
    return ((auth.USER_KEY, user),) if user else ()


def translate(exc: grpc.aio.AioRpcError) -> MailmeshError:
    """The MailmeshError matching a status received from a peer (UNAVAILABLE stays temporary)."""
    return from_grpc(exc.code(), exc.details() or "")
