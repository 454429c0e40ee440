"""FastAPI dependencies: the gateway state, the authenticated user (Bearer token), the acting-user
gRPC metadata, and the WebSocket variant of authentication."""

from __future__ import annotations

from fastapi import Request

from mailmesh_common import auth
from svc_gateway.errors import unauthorized
from svc_gateway.state import GatewayState
from svc_gateway.tokens import TokenInfo


def gateway(request: Request) -> GatewayState:
    gw: GatewayState = request.app.state.gw
    return gw


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def current_user(request: Request) -> TokenInfo:
    """The owner of the request's bearer token (401 otherwise); counts the request against the
    user's rate limit (429 beyond it)."""
    token = bearer_token(request)
    if token is None:
        raise unauthorized("missing bearer token (Authorization: Bearer <token>)")
    gw = gateway(request)
    info = await gw.tokens.lookup(token)
    if info is None:
        raise unauthorized("invalid or expired token")
    gw.limits.request(info.user_id)
    request.state.user = info
    return info


def grpc_metadata(user: TokenInfo) -> tuple[tuple[str, str], ...]:
    """Metadata naming the acting user on calls to the mesh (the mesh token is added by the channel)."""
    return ((auth.USER_KEY, user.user_id),)


async def websocket_user(gw: GatewayState, token: str | None) -> TokenInfo | None:
    """The owner of a token presented on a WebSocket (query parameter or subprotocol), or None."""
    if not token:
        return None
    return await gw.tokens.lookup(token)
