"""`POST /v1/auth/token` (email + password → bearer token) and `POST /v1/auth/logout`.

Failed logins are counted per account and per client IP; over either limit the endpoint answers
429 RATE_LIMITED with Retry-After, before the password is even checked."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
from fastapi import APIRouter, Request, Response
from mailmesh.v1 import mailbox_service_pb2 as mpb

from mailmesh_common import telemetry
from svc_gateway.deps import bearer_token, current_user, gateway
from svc_gateway.errors import from_grpc, unauthorized
from svc_gateway.rest.common import CALL_TIMEOUT_S, ERRORS, json
from svc_gateway.rest.models import TokenRequest, TokenResponse

router = APIRouter(prefix="/v1/auth", tags=["auth"])
_BAD_LOGIN = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.PERMISSION_DENIED}


@router.post("/token", response_model=TokenResponse,
             responses={k: v for k, v in ERRORS.items() if k in (400, 401, 413, 429, 503)})
async def issue_token(body: TokenRequest, request: Request) -> Response:
    """Exchanges an email address and password for an opaque bearer token."""
    gw = gateway(request)
    account_key = body.email.strip().lower()
    ip = request.client.host if request.client else "?"
    with telemetry.tracer("svc_gateway").start_as_current_span("gateway.login"):
        await gw.limits.check_login(account_key, ip)
        try:
            r = await gw.mailbox.Authenticate(mpb.AuthenticateRequest(email=body.email, password=body.password),
                                             timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _BAD_LOGIN:
                await gw.limits.login_failed(account_key, ip)
                raise unauthorized("wrong email or password") from None
            raise from_grpc(exc) from None
        await gw.limits.login_succeeded(account_key)
        token, expires_at = await gw.tokens.issue(r.account.user_id, r.account.email)
    return json({"accessToken": token, "tokenType": "Bearer",
                 "expiresIn": max(0, int(gw.tokens.ttl_s)),
                 "expireTime": datetime.fromtimestamp(expires_at, UTC).isoformat().replace("+00:00", "Z"),
                 "userId": r.account.user_id})


@router.post("/logout", status_code=204, responses={k: v for k, v in ERRORS.items() if k in (401, 429, 503)})
async def logout(request: Request) -> Response:
    """Revokes the bearer token of the request; it stops working at once."""
    await current_user(request)
    token = bearer_token(request)
    assert token is not None
    await gateway(request).tokens.revoke(token)
    return Response(status_code=204)
