"""`GET /v1/profile`: the authenticated user's account."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from mailmesh.v1 import mailbox_service_pb2 as mpb

from svc_gateway.deps import gateway
from svc_gateway.rest import convert
from svc_gateway.rest.common import ERRORS, ME, User, call, json
from svc_gateway.rest.models import Profile
from svc_gateway.tokens import TokenInfo

router = APIRouter(prefix="/v1", tags=["profile"])


@router.get("/profile", response_model=Profile, responses=ERRORS)
async def get_profile(request: Request, user: TokenInfo = User) -> Response:
    """The account: addresses, display name, quota, usage, message count and newest history id."""
    r = await gateway(request).mailbox.GetAccount(mpb.GetAccountRequest(name=ME), **call(user))
    return json(convert.profile(r.account))
