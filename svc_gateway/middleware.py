"""ASGI middleware of the REST gateway: a SERVER span per HTTP request (joining the caller's
`traceparent`), the request body size limit (413 beyond it), and response hardening headers."""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mailmesh_common import telemetry

# after a 413 on a streamed body, at most this much more of it is read and discarded
DRAIN_LIMIT = 4 * 1024 * 1024


class _TooLarge(Exception):
    pass


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        ctx = telemetry.extract_context(headers)
        method = scope.get("method", "")
        with telemetry.tracer("svc_gateway").start_as_current_span(
                f"HTTP {method}", context=ctx, kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "url.path": scope.get("path", "")}) as span:
            await self._handle(scope, receive, send, headers, span)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str],
                      span: Any) -> None:
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._reply(send, 400, "INVALID_REQUEST", "invalid Content-Length")
                return
            if int(declared) > limit:
                await self._reply(send, 413, "ATTACHMENT_TOO_LARGE",
                                  f"request body over the limit of {limit} bytes")
                return
        received = 0
        started = False
        replied = False  # the 413 went out: whatever the app sends afterwards is dropped

        async def limited_receive() -> Message:
            nonlocal received, replied
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started and not replied:
                        # read (a bounded amount of) the rest first: a client still sending its
                        # body would not read an answer sent before
                        drained = 0
                        more = message.get("more_body", False)
                        while more and drained < DRAIN_LIMIT:
                            rest = await receive()
                            if rest["type"] != "http.request":
                                break
                            drained += len(rest.get("body", b""))
                            more = rest.get("more_body", False)
                        replied = True
                        span.set_attribute("http.response.status_code", 413)
                        await self._reply(send, 413, "ATTACHMENT_TOO_LARGE",
                                          f"request body over the limit of {limit} bytes")
                    raise _TooLarge
            return message

        async def hardened_send(message: Message) -> None:
            nonlocal started
            if replied:
                return
            if message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                extra = [(b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store")]
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = dict(message)
                message["headers"] = [*message.get("headers", []), *[h for h in extra if h[0] not in present]]
            await send(message)

        try:
            await self.app(scope, limited_receive, hardened_send)
        except _TooLarge:
            pass  # answered in limited_receive
        route = scope.get("route")
        path_format = getattr(route, "path_format", None)
        if path_format:
            span.update_name(f"HTTP {scope.get('method', '')} {path_format}")
            span.set_attribute("http.route", path_format)

    @staticmethod
    async def _reply(send: Send, status: int, code: str, message: str) -> None:
        body = _error_body(code, message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"x-content-type-options", b"nosniff"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
