"""The REST error face: `ApiError`, its JSON body `{"error": {"code", "message"}}`, and the
mapping of gRPC statuses received from the mesh onto HTTP statuses (never leaking internals)."""

from __future__ import annotations

import logging

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailmesh_common.errors import MailmeshError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error with a stable machine-readable code and a developer-facing message."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", message)


def not_found(message: str = "not found") -> ApiError:
    return ApiError(404, "NOT_FOUND", message)


def unauthorized(message: str = "a valid bearer token is required") -> ApiError:
    return ApiError(401, "UNAUTHORIZED", message)


def rate_limited(retry_after: int, message: str = "rate limit exceeded") -> ApiError:
    return ApiError(429, "RATE_LIMITED", message, retry_after=max(1, retry_after))


_GRPC: dict[grpc.StatusCode, tuple[int, str, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "INVALID_REQUEST", "invalid request"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "INVALID_REQUEST", "value out of range"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "UNAUTHORIZED", "not authenticated"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "FORBIDDEN", "permission denied"),
    grpc.StatusCode.NOT_FOUND: (404, "NOT_FOUND", "not found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "CONFLICT", "already exists"),
    grpc.StatusCode.ABORTED: (409, "CONFLICT", "conflict, try again"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "FAILED_PRECONDITION", "failed precondition"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "RATE_LIMITED", "limit exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "SERVICE_UNAVAILABLE", "service unavailable, try again later"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (503, "SERVICE_UNAVAILABLE", "service timed out, try again later"),
}
# statuses whose details are written by our own services for the caller (no internals)
_PASS_DETAILS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED}
_MAX_DETAIL = 300


def from_grpc(err: grpc.aio.AioRpcError) -> ApiError:
    """The ApiError for a status received from a mesh service."""
    code = err.code()
    status, api_code, default = _GRPC.get(code, (503, "SERVICE_UNAVAILABLE", "service error, try again later"))
    if code not in _GRPC:
        log.error("gateway: unexpected gRPC status %s from the mesh: %s", code, err.details())
    details = (err.details() or "") if code in _PASS_DETAILS else ""
    message = details[:_MAX_DETAIL] or default
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than" in message.lower():
        return ApiError(413, "ATTACHMENT_TOO_LARGE", message)
    return ApiError(status, api_code, message, retry_after=60 if status == 429 else None)


def error_response(status: int, code: str, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if status == 401:  # RFC 6750 3
        headers["WWW-Authenticate"] = 'Bearer realm="mailmesh"'
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


_HTTP_CODES = {400: "INVALID_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND",
               405: "METHOD_NOT_ALLOWED", 406: "NOT_ACCEPTABLE", 413: "ATTACHMENT_TOO_LARGE",
               415: "UNSUPPORTED_MEDIA_TYPE", 429: "RATE_LIMITED"}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    methods: set[str] = set()
    for route in app.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Renders every error as `{"error": {...}}`; unexpected exceptions become an opaque 500."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.retry_after)

    async def grpc_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, grpc.aio.AioRpcError)
        e = from_grpc(exc)
        return error_response(e.status, e.code, e.message, e.retry_after)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(400, "INVALID_REQUEST", _validation_message(exc)[:500])

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "INVALID_REQUEST" if exc.status_code < 500 else "INTERNAL")
        message = exc.detail if isinstance(exc.detail, str) else code.lower()
        resp = error_response(exc.status_code, code, message)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        if exc.status_code == 405:  # every method of every route at this path, not just the first
            resp.headers["Allow"] = ", ".join(_allowed_methods(app, request.url.path))
        return resp

    async def mailmesh_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, MailmeshError)
        if exc.http_status >= 500:
            log.error("gateway: %s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc.message)
            if exc.http_status == 503:
                return error_response(503, "SERVICE_UNAVAILABLE", "service unavailable, try again later")
            return error_response(500, "INTERNAL", "internal error")
        return error_response(exc.http_status, exc.http_code, exc.message[:_MAX_DETAIL],
                              60 if exc.http_status == 429 else None)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("gateway: unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "INTERNAL", "internal error")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(grpc.aio.AioRpcError, grpc_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(MailmeshError, mailmesh_error)
    app.add_exception_handler(Exception, unexpected)
