"""Process bootstrap shared by every `python -m svc_x`: settings, logs, tracing, NATS and
streams, the gRPC server, background tasks, and a clean exit code.

Exit codes: 0 after a clean drain, 2 for bad configuration, 3 when the port is taken,
4 when a dependency (NATS, the KV store) cannot be reached at start.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from mailmesh_common import streams, telemetry
from mailmesh_common.config import Settings, load_settings
from mailmesh_common.errors import ConfigError, MailmeshError, Unavailable
from mailmesh_common.grpcserver import GrpcServer, PortInUse
from mailmesh_common.logging import setup_logging

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
EXIT_PORT = 3
EXIT_DEPENDENCY = 4


@dataclass
class ServiceContext:
    name: str
    settings: Settings
    server: GrpcServer
    nc: NATS | None = None
    js: JetStreamContext | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # the service's main objects by name, for wiring and for in-process tests
    components: dict[str, Any] = field(default_factory=dict)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Runs a background loop; if it dies unexpectedly the process exits so it is restarted."""
        task = asyncio.create_task(coro, name=name)

        def done(t: asyncio.Task[Any]) -> None:
            if t.cancelled() or self.stop.is_set():
                return
            exc = t.exception()
            log.error("%s: background task %s ended unexpectedly: %r", self.name, name, exc)
            self.server.stop()

        task.add_done_callback(done)
        self.tasks.append(task)


Register = Callable[[ServiceContext], Awaitable[None]]


async def connect_nats(settings: Settings, name: str, attempts: int = 20) -> NATS:
    last: Exception | None = None
    for _ in range(attempts):
        try:
            return await streams.connect(settings.resolved_nats_url(), name=name, timeout_s=2.0)
        except Unavailable as exc:
            last = exc
            await asyncio.sleep(0.5)
    raise Unavailable(f"NATS not reachable at {settings.resolved_nats_url()}: {last}")


async def serve(name: str, port: int, settings: Settings, register: Register, *,
                service_names: tuple[str, ...] = (), needs_nats: bool = True) -> ServiceContext:
    """Starts a service and returns its context (the caller awaits `run_until_stopped`)."""
    server = GrpcServer(name, settings, port, service_names)
    ctx = ServiceContext(name=name, settings=settings, server=server)
    if needs_nats:
        ctx.nc = await connect_nats(settings, name)
        ctx.js = ctx.nc.jetstream(timeout=10)
        await streams.ensure_streams(ctx.js, replicas=settings.stream_replicas)
    await register(ctx)
    await server.start()
    return ctx


async def run_until_stopped(ctx: ServiceContext, *, signals: bool = True) -> None:
    if signals:
        ctx.server.install_signal_handlers()
    await ctx.server.wait()
    ctx.stop.set()
    for task in ctx.tasks:
        task.cancel()
    await asyncio.gather(*ctx.tasks, return_exceptions=True)
    for close in reversed(ctx.closers):
        try:
            await close()
        except Exception:
            log.exception("%s: error while closing", ctx.name)
    if ctx.nc is not None:
        try:
            await asyncio.wait_for(ctx.nc.drain(), 5)
        except Exception:
            pass


def main(name: str, port_setting: str, register: Register, *, service_names: tuple[str, ...] = (),
         needs_nats: bool = True, prepare: Callable[[Settings], None] | None = None) -> None:
    """Entry point for `python -m svc_x`; `prepare` runs first, while the process has one thread."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"{name}: configuration error: {exc.message}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    setup_logging(name, settings.log_level, settings.log_format)
    if prepare is not None:
        prepare(settings)
    telemetry.setup_telemetry(name, trace_file=settings.trace_file)

    async def _run() -> int:
        try:
            ctx = await serve(name, getattr(settings, port_setting), settings, register,
                              service_names=service_names, needs_nats=needs_nats)
        except PortInUse as exc:
            log.error("%s", exc)
            print(f"{name}: {exc}", file=sys.stderr)
            return EXIT_PORT
        except MailmeshError as exc:
            log.error("%s: cannot start: %s", name, exc.message)
            print(f"{name}: cannot start: {exc.message}", file=sys.stderr)
            return EXIT_DEPENDENCY
        await run_until_stopped(ctx)
        return 0

    code = asyncio.run(_run())
    telemetry.shutdown_telemetry()
    sys.exit(code)
