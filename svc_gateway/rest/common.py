"""Shared pieces of the REST routers: the documented error responses, path id checks, the
"users/me" resource names and the JSON response helper."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Depends, Path
from fastapi.responses import JSONResponse

from svc_gateway.deps import current_user, grpc_metadata
from svc_gateway.errors import invalid
from svc_gateway.rest.models import ID_PATTERN, ErrorBody
from svc_gateway.tokens import TokenInfo

ME = "users/me"
_ID = re.compile(ID_PATTERN)


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# error statuses every authenticated endpoint may answer
ERRORS: dict[int | str, dict[str, Any]] = {
    400: _err("INVALID_REQUEST: a malformed parameter or body"),
    401: _err("UNAUTHORIZED: missing, invalid, expired or revoked bearer token"),
    403: _err("FORBIDDEN"),
    404: _err("NOT_FOUND"),
    409: _err("CONFLICT / FAILED_PRECONDITION"),
    413: _err("ATTACHMENT_TOO_LARGE: request body or message over the size limit"),
    429: {**_err("RATE_LIMITED: retry after Retry-After seconds"),
          "headers": {"Retry-After": {"description": "Seconds to wait before retrying",
                                      "schema": {"type": "integer", "minimum": 1}}}},
    503: _err("SERVICE_UNAVAILABLE: a backend service is unavailable; retry later"),
}

User = Depends(current_user)
MessageId = Annotated[str, Path(pattern=ID_PATTERN, description="Message id")]
LabelId = Annotated[str, Path(pattern=ID_PATTERN, description="Label id (INBOX, Label_3...)")]
ThreadId = Annotated[str, Path(pattern=ID_PATTERN, description="Thread id")]
DraftId = Annotated[str, Path(pattern=ID_PATTERN, description="Draft id")]


def check_id(value: str, what: str = "id") -> str:
    if not _ID.match(value):
        raise invalid(f"{what} is not a valid id")
    return value


def message_name(msg_id: str) -> str:
    return f"{ME}/messages/{check_id(msg_id, 'message id')}"


# bound on one unary call to the mesh (the services also apply their own default deadline)
CALL_TIMEOUT_S = 30.0


def md(user: TokenInfo) -> tuple[tuple[str, str], ...]:
    return grpc_metadata(user)


def call(user: TokenInfo) -> dict[str, Any]:
    """Keyword arguments of a unary call to the mesh on behalf of `user`: the acting-user
    metadata and a deadline."""
    return {"metadata": grpc_metadata(user), "timeout": CALL_TIMEOUT_S}


def json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status)
