"""The REST gateway's FastAPI application: routers per resource (svc_gateway/rest/), the WebSocket
push router (svc_gateway/push.py), error rendering, CORS, limits and tracing."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from svc_gateway import errors, push
from svc_gateway.middleware import GatewayMiddleware
from svc_gateway.rest import ROUTERS
from svc_gateway.state import GatewayState

log = logging.getLogger(__name__)

DESCRIPTION = """mailmesh REST API. Authenticate with `POST /v1/auth/token`, then send
`Authorization: Bearer <token>` on every other call. JSON follows the protobuf JSON mapping of the
mailmesh.v1 contracts (camelCase names, 64-bit integers as strings, RFC 3339 timestamps, base64 bytes).
Errors are `{"error": {"code": "...", "message": "..."}}`."""


def create_app(gw: GatewayState) -> FastAPI:
    app = FastAPI(title="mailmesh", version="1", description=DESCRIPTION, docs_url="/docs",
                  redoc_url="/redoc", openapi_url="/openapi.json")
    app.state.gw = gw
    errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(push.router)  # WebSocket /v1/events and GET /v1/history
    origins = list(gw.settings.gateway_cors_origins)
    if origins:
        # bearer tokens, no cookies: credentials are never needed
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
                           expose_headers=["Retry-After"], max_age=600)
    app.add_middleware(GatewayMiddleware, max_body_bytes=gw.settings.gateway_max_request_bytes)
    _document(app)
    return app


def _document(app: FastAPI) -> None:
    """The OpenAPI document as served: validation errors are 400 INVALID_REQUEST (not FastAPI's
    422), and every path but the token endpoint requires the bearer scheme."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).pop("HTTPValidationError", None)
        components["schemas"].pop("ValidationError", None)
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, ops in schema.get("paths", {}).items():
            for op in ops.values():
                if not isinstance(op, dict):
                    continue
                op.get("responses", {}).pop("422", None)
                if path != "/v1/auth/token":
                    op["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
