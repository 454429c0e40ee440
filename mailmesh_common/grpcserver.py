"""The asyncio gRPC server every service runs: health, reflection, tracing, auth, error mapping,
default deadlines, and a graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mailmesh_common import auth, telemetry
from mailmesh_common.config import Settings
from mailmesh_common.errors import MailmeshError

log = logging.getLogger(__name__)

_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class PortInUse(RuntimeError):
    pass


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, MailmeshError):
        return exc.grpc_code, exc.message
    if isinstance(exc, asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    return grpc.StatusCode.INTERNAL, "internal error"


class MeshInterceptor(grpc.aio.ServerInterceptor):
    """Checks the internal token, sets the acting user, applies a default deadline, and turns
    MailmeshError into a gRPC status (anything else: INTERNAL, logged, no internals leaked)."""

    def __init__(self, token: str, default_deadline_s: float) -> None:
        self.token = token.encode()
        self.default_deadline_s = default_deadline_s

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(_EXEMPT_PREFIXES):
            return handler
        md = {k: v for k, v in (details.invocation_metadata or ())}
        token = md.get(auth.TOKEN_KEY, "")
        token_ok = bool(self.token) and hmac.compare_digest(
            token.encode() if isinstance(token, str) else token, self.token)
        user_raw = md.get(auth.USER_KEY) or None
        user = user_raw.decode() if isinstance(user_raw, bytes) else user_raw
        deadline = self.default_deadline_s

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if not token_ok:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid mesh token")
                tok = auth.set_acting_user(user)
                try:
                    remaining = context.time_remaining()
                    budget = deadline if remaining is None else min(deadline, max(remaining, 0.001))
                    return await asyncio.wait_for(inner(request, context), budget)
                except MailmeshError as exc:
                    await context.abort(exc.grpc_code, exc.message)
                except TimeoutError:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method}: deadline exceeded")
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception:
                    log.exception("unhandled error in %s", method)
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
                finally:
                    auth.reset_acting_user(tok)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if not token_ok:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid mesh token")
                tok = auth.set_acting_user(user)
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except MailmeshError as exc:
                    await context.abort(exc.grpc_code, exc.message)
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except Exception:
                    log.exception("unhandled error in %s", method)
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
                finally:
                    auth.reset_acting_user(tok)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


class GrpcServer:
    """One service's gRPC server. `start()` binds (raising PortInUse), `wait()` serves until a
    signal or `stop()`, then drains: health NOT_SERVING, refuse new calls, finish in-flight ones."""

    def __init__(self, name: str, settings: Settings, port: int,
                 service_names: Iterable[str] = (), grace_s: float = 5.0) -> None:
        self.name = name
        self.settings = settings
        self.port = port
        self.grace_s = grace_s
        self.server = grpc.aio.server(
            interceptors=[*telemetry.grpc_server_interceptors(),
                          MeshInterceptor(settings.token(), settings.grpc_default_deadline_s)],
            options=[("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
                     ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
                     # exclusive, except for svc_ingest's workers sharing its port (ingest_workers)
                     ("grpc.so_reuseport", int(name == "svc_ingest" and settings.ingest_workers > 1))],
        )
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        self._stop = asyncio.Event()
        self.on_stop: list[Callable[[], Awaitable[None]]] = []
        self.bound_port = 0

    async def start(self) -> None:
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        address = f"{self.settings.host}:{self.port}"
        try:
            self.bound_port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise PortInUse(f"{self.name}: cannot listen on {address}: port in use or not available") from exc
        if self.bound_port == 0:
            raise PortInUse(f"{self.name}: cannot listen on {address}: port in use or not available")
        await self.server.start()
        await self.set_serving(True)
        log.info("%s gRPC listening on %s:%d", self.name, self.settings.host, self.bound_port)

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for svc in ("", *self.service_names):
            res = self.health.set(svc, status)
            if asyncio.iscoroutine(res):
                await res

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._stop.set)

    def stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()
        log.info("%s draining", self.name)
        await self.set_serving(False)
        await self.server.stop(self.grace_s)
        for hook in reversed(self.on_stop):
            try:
                await hook()
            except Exception:
                log.exception("%s: error during shutdown", self.name)
        log.info("%s stopped", self.name)
