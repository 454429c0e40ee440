"""`mailmesh up`: runs the whole mesh on one machine and supervises it.

Checks that every port is free, starts nats-server (JetStream, fsync on every write) and the
five services as separate processes, waits until NATS answers and every gRPC health check
says SERVING, prints the endpoints, then restarts whatever crashes (exponential backoff) until
SIGINT/SIGTERM stops everything: services first, nats-server last, no orphans.

Files under the data dir: `nats/` (config and JetStream store), `logs/<component>.log`,
`logs/supervisor.log`, `mailmesh.pid`, `pids.json` (component -> pid), `endpoints.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from mailmesh_common import streams
from mailmesh_common.cli.status import NATS, SERVING, grpc_health, service_key
from mailmesh_common.config import ENV_PREFIX, Settings, ingest_processes, load_settings, settings_env
from mailmesh_common.natsserver import (
    NatsServer,
    NatsServerNotFound,
    NatsServerNotReady,
    find_nats_server,
    jetstream_ready,
    open_log,
    signal_group,
    spawn,
    stop_processes,
    tail,
    wait_ready,
)

# start order; shutdown is the same order, nats-server last
SERVICES = ("svc_mailbox", "svc_ingest", "svc_search", "svc_send", "svc_gateway")

# every port the mesh listens on, by the component that owns it
PORT_SETTINGS: tuple[tuple[str, str], ...] = (
    (NATS, "nats_port"),
    ("svc_mailbox", "mailbox_port"),
    ("svc_ingest", "ingest_port"),
    ("svc_search", "search_port"),
    ("svc_send", "send_port"),
    ("svc_gateway", "gateway_port"),
    ("svc_ingest", "smtp_port"),
    ("svc_send", "submission_port"),
    ("svc_gateway", "http_port"),
    ("svc_gateway", "imap_port"),
)

# service exit codes (mailmesh_common.service)
EXIT_MEANINGS = {2: "configuration error", 3: "port already in use", 4: "dependency unreachable"}

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
BACKOFF_RESET_AFTER_S = 60.0
STOP_TIMEOUT_S = 10.0
TICK_S = 0.2
# nats-server disables JetStream after a storage error (a full disk) and keeps it so, running,
# until restarted: the supervisor asks JetStream every JETSTREAM_CHECK_S and restarts a running
# nats-server that missed JETSTREAM_FAILURES answers in a row
JETSTREAM_CHECK_S = 10.0
JETSTREAM_FAILURES = 6


# Protocol listeners the services serve today, printed by `up`. Their ports are reserved and
# checked already; each joins this list with the issue that implements it:
# ("svc_gateway", "HTTP", "http"), ("svc_gateway", "IMAP", "imap").
SERVED_PROTOCOLS: tuple[tuple[str, str, str], ...] = (("svc_ingest", "SMTP", "smtp"),
                                                      ("svc_send", "submission", "submission"),
                                                      ("svc_gateway", "HTTP", "http"))


class UpError(Exception):
    """A reason `mailmesh up` cannot start; the message is printed as is."""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    meaning = EXIT_MEANINGS.get(code)
    return f"code {code}" + (f" ({meaning})" if meaning else "")


# --- ports ----------------------------------------------------------------------------------------

def port_problem(host: str, port: int) -> str | None:
    """None when `host:port` can be listened on, else why not. Uses SO_REUSEADDR like gRPC and
    nats-server do, so only a live listener (not TIME_WAIT leftovers) counts as in use."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "port already in use"
            return exc.strerror or str(exc)
    return None


def check_ports(settings: Settings) -> None:
    """UpError naming the first component whose port is taken or configured twice."""
    seen: dict[int, str] = {}
    for component, setting in PORT_SETTINGS:
        port = int(getattr(settings, setting))
        env_name = ENV_PREFIX + setting.upper()
        if port in seen:
            raise UpError(f"mailmesh up: {component} and {seen[port]} are both configured to listen on "
                          f"port {port} (check {env_name})")
        seen[port] = component
        problem = port_problem(settings.host, port)
        if problem:
            raise UpError(f"mailmesh up: {component} cannot listen on {settings.host}:{port}: {problem} "
                          f"(set {env_name} to use another port)")


def running_supervisor(data_dir: Path) -> int | None:
    """The pid of a live `mailmesh up` recorded in `data_dir/mailmesh.pid`, if any."""
    try:
        pid = int((data_dir / "mailmesh.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid  # no /proc: assume it is ours
    return pid if b"mailmesh" in cmdline else None


# --- components -----------------------------------------------------------------------------------

@dataclass
class Component:
    name: str
    argv: list[str]
    log_file: Path
    env: dict[str, str] | None = None
    grpc_addr: str | None = None
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff_s: float = BACKOFF_START_S
    restart_at: float | None = None
    restarts: int = 0

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(f"=== {datetime.now(UTC).isoformat(timespec='milliseconds')} mailmesh up: starting "
                    f"{self.name} ===\n")
        self.proc = spawn(self.argv, log_file=self.log_file, env=self.env, cwd=self.cwd)
        self.started_at = time.monotonic()
        self.restart_at = None

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None


@dataclass
class Supervisor:
    settings: Settings
    nats: NatsServer
    start_timeout_s: float = 30.0
    components: list[Component] = field(default_factory=list)
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    log_stream: IO[str] | None = None
    jetstream_check_s: float = JETSTREAM_CHECK_S
    jetstream_failures: int = JETSTREAM_FAILURES

    # --- paths and records ---
    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir

    @property
    def logs_dir(self) -> Path:
        return self.settings.data_dir / "logs"

    def log(self, message: str) -> None:
        line = f"{datetime.now(UTC).isoformat(timespec='milliseconds')} mailmesh up: {message}"
        print(line, file=sys.stderr, flush=True)
        if self.log_stream is not None:
            with contextlib.suppress(OSError):
                self.log_stream.write(line + "\n")

    def _write_json(self, name: str, doc: object) -> None:
        path = self.data_dir / name
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)

    def write_pids(self) -> None:
        pids: dict[str, int | None] = {"supervisor": os.getpid()}
        for c in self.components:
            pids[c.name] = c.proc.pid if c.proc is not None and c.proc.poll() is None else None
        self._write_json("pids.json", pids)

    def endpoints(self) -> dict[str, str]:
        """Every address the mesh owns (protocol ports are reserved even before they are served)."""
        s = self.settings
        out: dict[str, str] = {name: f"{s.host}:{getattr(s, service_key(name) + '_port')}" for name in SERVICES}
        out[NATS] = self.nats.url
        out.update({"smtp": f"{s.host}:{s.smtp_port}", "submission": f"{s.host}:{s.submission_port}",
                    "http": f"http://{s.host}:{s.http_port}", "imap": f"{s.host}:{s.imap_port}",
                    "data_dir": str(s.data_dir), "logs_dir": str(self.logs_dir)})
        return out

    def print_endpoints(self) -> None:
        e = self.endpoints()
        rows = [(name, "gRPC", e[name]) for name in SERVICES]
        rows += [(name, kind, e[key]) for name, kind, key in SERVED_PROTOCOLS]
        rows += [("nats", "NATS", e[NATS])]
        print("mailmesh endpoints:")
        for name, kind, addr in rows:
            print(f"  {name:<12} {kind:<11} {addr}")
        print(f"  {'data dir':<24} {e['data_dir']}")
        print(f"  {'logs':<24} {e['logs_dir']}")
        print(f"mailmesh is up (supervisor pid {os.getpid()}); Ctrl-C stops it")
        sys.stdout.flush()

    # --- building ---
    def build(self) -> None:
        env = dict(os.environ)
        env.pop(ENV_PREFIX + "CONFIG", None)  # the settings below are complete
        # the number of ingest workers resolved here, so each worker knows it shares its ports
        ingest_workers = ingest_processes(self.settings)
        env.update(settings_env(dataclasses.replace(self.settings, ingest_workers=ingest_workers)))
        env["PYTHONUNBUFFERED"] = "1"
        # cwd is the data dir: `python -m svc_x` imports the installed package, never whatever
        # checkout the command was started from
        self.components = [Component(NATS, self.nats.argv(), self.logs_dir / "nats.log", cwd=self.data_dir)]
        for name in SERVICES:
            # svc_ingest may run as several processes sharing its ports (ingest_workers, SO_REUSEPORT)
            workers = ingest_workers if name == "svc_ingest" else 1
            for k in range(workers):
                label = name if k == 0 else f"{name}-{k + 1}"
                self.components.append(Component(
                    label, [sys.executable, "-m", name], self.logs_dir / f"{label}.log", env=env, cwd=self.data_dir,
                    grpc_addr=f"{self.settings.host}:{getattr(self.settings, service_key(name) + '_port')}"))

    @property
    def nats_component(self) -> Component:
        return self.components[0]

    @property
    def services(self) -> list[Component]:
        return self.components[1:]

    # --- start ---
    def _start_failure(self, c: Component) -> UpError:
        assert c.proc is not None
        last = tail(c.log_file)
        detail = f"; last lines of {c.log_file}:\n{last}" if last else f"; see {c.log_file}"
        return UpError(f"mailmesh up: {c.name} exited during start with {describe_exit(c.proc.returncode)}"
                       f"{detail}")

    async def start_nats(self) -> None:
        c = self.nats_component
        c.start()
        self.write_pids()
        try:
            await self._until_stopped(wait_ready(self.nats.url, c.proc, timeout_s=self.start_timeout_s,
                                                 log_file=c.log_file))
        except NatsServerNotReady as exc:
            raise UpError(f"mailmesh up: nats-server did not start: {exc}") from None
        if self.stop_event.is_set():
            return
        nc = await asyncio.wait_for(streams.connect(self.nats.url, name="mailmesh-up", max_reconnect=1), 10)
        try:
            await streams.ensure_streams(nc.jetstream(timeout=10))
        finally:
            await nc.close()

    async def _until_stopped(self, coro: Coroutine[Any, Any, None]) -> None:
        """Awaits `coro` unless a stop signal comes first (then cancels it)."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self.stop_event.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if task in done:
            task.result()
        else:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def start_services(self) -> None:
        for c in self.services:
            c.start()
        self.write_pids()
        deadline = time.monotonic() + self.start_timeout_s
        pending = {c.name: c for c in self.services}
        last: dict[str, str] = {}
        while pending and not self.stop_event.is_set():
            for c in pending.values():
                if c.exited():
                    raise self._start_failure(c)
            if self.nats_component.exited():
                raise self._start_failure(self.nats_component)
            answers = await asyncio.gather(*(grpc_health(c.grpc_addr or "", 1.0) for c in pending.values()))
            for c, answer in zip(list(pending.values()), answers, strict=True):
                last[c.name] = answer
                if answer == SERVING:
                    del pending[c.name]
            if not pending:
                break
            if time.monotonic() >= deadline:
                name = next(iter(pending))
                raise UpError(f"mailmesh up: {name} not SERVING after {self.start_timeout_s:.0f}s "
                              f"(health: {last.get(name, 'UNREACHABLE')}); see {pending[name].log_file}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), 0.2)

    # --- supervise ---
    def tick(self) -> None:
        now = time.monotonic()
        changed = False
        for c in self.components:
            if c.proc is not None and c.exited():
                uptime = now - c.started_at
                if uptime >= BACKOFF_RESET_AFTER_S:
                    c.backoff_s = BACKOFF_START_S
                delay = c.backoff_s
                c.backoff_s = min(c.backoff_s * 2, BACKOFF_MAX_S)
                signal_group(c.proc, signal.SIGKILL)  # leftovers of its process group
                self.log(f"{c.name} (pid {c.proc.pid}) exited with {describe_exit(c.proc.returncode)} "
                         f"after {uptime:.1f}s; restarting in {delay:.1f}s; last lines of {c.log_file}:\n"
                         f"{tail(c.log_file, 5)}")
                c.proc = None
                c.restart_at = now + delay
                changed = True
            elif c.proc is None and c.restart_at is not None and now >= c.restart_at:
                try:
                    c.start()
                except OSError as exc:
                    c.restart_at = now + c.backoff_s
                    c.backoff_s = min(c.backoff_s * 2, BACKOFF_MAX_S)
                    self.log(f"{c.name}: cannot restart: {exc}; next try in {c.restart_at - now:.1f}s")
                    continue
                c.restarts += 1
                assert c.proc is not None
                self.log(f"{c.name} restarted (restart #{c.restarts}, pid {c.proc.pid})")
                changed = True
        if changed:
            self.write_pids()

    async def supervise(self) -> None:
        watcher = asyncio.create_task(self.watch_jetstream())
        try:
            while not self.stop_event.is_set():
                self.tick()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), TICK_S)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def watch_jetstream(self) -> None:
        """Stops a nats-server that runs but whose JetStream no longer answers (see
        JETSTREAM_CHECK_S), so that `tick` restarts it: accepted mail then flows again once the
        cause (say, the full disk) is gone, without an operator restarting it by hand."""
        missed = 0
        while not self.stop_event.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), self.jetstream_check_s)
            c = self.nats_component
            proc = c.proc
            if self.stop_event.is_set() or proc is None or c.exited() \
                    or time.monotonic() - c.started_at < self.jetstream_check_s:
                missed = 0  # not running, or just (re)started: tick and start-up look after it
                continue
            if await jetstream_ready(self.nats.url, min(5.0, self.jetstream_check_s)):
                missed = 0
                continue
            missed += 1
            if missed < self.jetstream_failures:
                continue
            self.log(f"{c.name} (pid {proc.pid}) runs but its JetStream did not answer {missed} checks in a row; "
                     f"restarting it; last lines of {c.log_file}:\n{tail(c.log_file, 5)}")
            signal_group(proc, signal.SIGCONT)  # a stopped process must run to handle SIGTERM
            await asyncio.to_thread(stop_processes, [proc], STOP_TIMEOUT_S)
            missed = 0

    # --- stop ---
    def stop_all(self) -> None:
        running = [c for c in self.services if c.proc is not None]
        if running:
            self.log("stopping services")
            stop_processes([c.proc for c in running if c.proc is not None], STOP_TIMEOUT_S)
        n = self.nats_component if self.components else None
        if n is not None and n.proc is not None:
            self.log("stopping nats-server")
            stop_processes([n.proc], STOP_TIMEOUT_S)
        for c in self.components:
            c.proc = None

    # --- everything ---
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            self.log(f"starting nats-server on {self.nats.url} (data dir {self.data_dir})")
            await self.start_nats()
            if not self.stop_event.is_set():
                self.log("starting " + ", ".join(SERVICES))
                await self.start_services()
            if not self.stop_event.is_set():
                self._write_json("endpoints.json", self.endpoints())
                self.print_endpoints()
                self.log("mailmesh is up")
                await self.supervise()
        except UpError as exc:
            print(str(exc), file=sys.stderr, flush=True)
            if self.log_stream is not None:
                self.log_stream.write(str(exc) + "\n")
            self.stop_all()
            return 1
        except BaseException:
            self.stop_all()
            raise
        self.stop_all()
        self.log("stopped")
        return 0

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stop_event.is_set():
            self.log(f"received {sig.name}, stopping")
        self.stop_event.set()


def run_up(args: argparse.Namespace) -> int:
    if not args.jetstream_check > 0 or args.jetstream_failures < 1:
        print("mailmesh up: --jetstream-check must be > 0 and --jetstream-failures >= 1", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir) if args.data_dir else None
    settings = load_settings(args.config, data_dir=data_dir)
    settings = dataclasses.replace(settings, data_dir=settings.data_dir.resolve())
    try:
        other = running_supervisor(settings.data_dir)
        if other is not None:
            raise UpError(f"mailmesh up: already running for {settings.data_dir} (pid {other}); "
                          "stop it first or use another --data-dir")
        binary = find_nats_server()
        check_ports(settings)
        if args.nats_monitor_port is not None and port_problem(settings.host, args.nats_monitor_port):
            raise UpError(f"mailmesh up: nats cannot listen on {settings.host}:{args.nats_monitor_port} "
                          "(monitor): port already in use")
    except NatsServerNotFound as exc:
        print(f"mailmesh up: {exc}", file=sys.stderr)
        return 1
    except UpError as exc:
        print(str(exc), file=sys.stderr)
        return 1

    data_dir = settings.data_dir
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    settings.token()  # create the shared internal token before any child reads it
    nats = NatsServer(data_dir / "nats", settings.host, settings.nats_port,
                      monitor_port=args.nats_monitor_port, log_file=logs / "nats.log", binary=binary)
    try:
        nats.prepare()
    except NatsServerNotReady as exc:
        print(f"mailmesh up: {exc}", file=sys.stderr)
        return 1

    pid_file = data_dir / "mailmesh.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    with open_log(logs / "supervisor.log") as log_stream:
        sup = Supervisor(settings, nats, start_timeout_s=args.start_timeout, log_stream=log_stream,
                         jetstream_check_s=args.jetstream_check, jetstream_failures=args.jetstream_failures)
        sup.build()
        try:
            return asyncio.run(sup.run())
        finally:
            for name in ("mailmesh.pid", "pids.json"):
                with contextlib.suppress(OSError):
                    (data_dir / name).unlink()


def add_up_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("up", help="run nats-server and the five services, supervised",
                       description="Starts nats-server and the five services on this machine, waits "
                                   "until all are healthy, prints the endpoints and supervises them "
                                   "until Ctrl-C.")
    p.add_argument("--data-dir", help="where state and logs live (default: settings, ./data)")
    p.add_argument("--config", help="TOML settings file (default: $MAILMESH_CONFIG)")
    p.add_argument("--nats-monitor-port", type=int, default=None,
                   help="serve nats-server's HTTP monitoring on this port (default: off)")
    p.add_argument("--start-timeout", type=float, default=30.0,
                   help="seconds to wait for every component to be healthy (default 30)")
    p.add_argument("--jetstream-check", type=float, default=JETSTREAM_CHECK_S, metavar="S",
                   help=f"seconds between checks that nats-server's JetStream answers (default {JETSTREAM_CHECK_S:g})")
    p.add_argument("--jetstream-failures", type=int, default=JETSTREAM_FAILURES, metavar="N",
                   help="unanswered checks in a row after which a running nats-server is restarted "
                        f"(default {JETSTREAM_FAILURES})")
    p.set_defaults(func=run_up)
