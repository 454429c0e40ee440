"""Wires svc_gateway: the gRPC health endpoint (gateway_port) and the REST + WebSocket HTTP
server (FastAPI on uvicorn, http_port); both stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from mailmesh_common.grpcserver import PortInUse
from mailmesh_common.service import ServiceContext, main
from svc_gateway import push
from svc_gateway.app import create_app
from svc_gateway.clients import connect

log = logging.getLogger(__name__)

# token sweeps: expired tokens are removed from the store this often
SWEEP_INTERVAL_S = 600.0
# concurrent HTTP connections + WebSockets per gateway process; beyond it uvicorn answers 503
MAX_CONCURRENCY = 4096


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service's GrpcServer owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only when the socket
    # says it is TCP; without it a response's header and body segments meet Nagle + delayed ACK
    # (40 ms per request on loopback)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUse(f"svc_gateway: cannot listen for HTTP on {host}:{port}: "
                        f"{exc.strerror or 'port in use or not available'}") from exc
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def register(ctx: ServiceContext) -> None:
    s = ctx.settings
    gw = connect(s, ctx.nc)
    ctx.closers.append(gw.close)
    app = create_app(gw)
    ctx.components.update(gateway=gw, app=app)
    sock = _listen(s.host, s.http_port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5, ws_max_size=1 << 20, limit_concurrency=MAX_CONCURRENCY,
                            h11_max_incomplete_event_size=64 * 1024)
    server = _Server(config)
    ctx.components["http_server"] = server
    task = asyncio.create_task(server.serve(sockets=[sock]), name="http-server")
    for _ in range(200):  # wait (bounded) for the listener to be up before the service reports ready
        if server.started or task.done():
            break
        await asyncio.sleep(0.025)
    if task.done() and not server.started:
        sock.close()
        raise PortInUse(f"svc_gateway: the HTTP server on {s.host}:{s.http_port} did not start")
    log.info("svc_gateway HTTP listening on %s:%d", s.host, s.http_port)

    def http_ended(t: asyncio.Task[None]) -> None:
        if not server.should_exit and not ctx.stop.is_set():  # the HTTP server died: exit, to be restarted
            log.error("svc_gateway: the HTTP server stopped unexpectedly: %r",
                      None if t.cancelled() else t.exception())
            ctx.server.stop()

    task.add_done_callback(http_ended)

    async def stop_http() -> None:
        with contextlib.suppress(Exception):  # WebSockets close with 1001 "going away", not uvicorn's 1012
            await asyncio.wait_for(push.shutdown(app), 5)
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), 10)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
        sock.close()

    ctx.closers.append(stop_http)  # closers run in reverse: HTTP stops before the channels close

    async def sweep() -> None:
        while not ctx.stop.is_set():
            try:
                await asyncio.wait_for(ctx.stop.wait(), SWEEP_INTERVAL_S)
            except TimeoutError:
                try:
                    await gw.tokens.sweep()
                    await gw.limits.sweep()
                except Exception:  # a failed sweep is retried at the next interval
                    log.warning("gateway: token sweep failed", exc_info=True)

    ctx.spawn(sweep(), "token-sweep")


def run() -> None:
    main("svc_gateway", "gateway_port", register)
