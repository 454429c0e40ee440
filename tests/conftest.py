"""Fixtures shared by every test: free ports, a real nats-server with JetStream, the MAILMESH_*
environment of a whole mesh on free ports, and a running `mailmesh up`.

Helpers are importable from tests as `from tests.conftest import free_port, mesh_env, MeshProcess`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mailmesh_common import telemetry
from mailmesh_common.natsserver import NatsServer

REPO = Path(__file__).resolve().parents[1]
CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"

# the ten ports of a mesh: five gRPC services, four protocol listeners, NATS
PORT_SETTINGS = ("mailbox", "search", "send", "ingest", "gateway", "smtp", "submission", "http", "imap", "nats")
# service -> the variable holding its gRPC port
SERVICE_PORT_VARS = {"svc_mailbox": "MAILMESH_MAILBOX_PORT", "svc_ingest": "MAILMESH_INGEST_PORT",
                     "svc_search": "MAILMESH_SEARCH_PORT", "svc_send": "MAILMESH_SEND_PORT",
                     "svc_gateway": "MAILMESH_GATEWAY_PORT"}


# --- ports ----------------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (all held open while choosing, so none repeats)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could listen on host:port now (SO_REUSEADDR, like gRPC and NATS)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError:
            return False
    return True


def mesh_env(data_dir: Path) -> dict[str, str]:
    """MAILMESH_* variables for a mesh on 127.0.0.1 with all ten ports free and its own data dir."""
    env = {f"MAILMESH_{name.upper()}_PORT": str(port)
           for name, port in zip(PORT_SETTINGS, free_ports(len(PORT_SETTINGS)), strict=True)}
    env["MAILMESH_HOST"] = "127.0.0.1"
    env["MAILMESH_DATA_DIR"] = str(data_dir)
    return env


# --- processes ------------------------------------------------------------------------------------

def mailmesh_argv(*args: str) -> list[str]:
    """The installed `mailmesh` console script (the module when the script is not installed)."""
    script = Path(sys.executable).parent / "mailmesh"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "mailmesh_common.cli.main", *args]


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without any MAILMESH_* of the developer's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILMESH_")}
    env.update(extra)
    return env


def run_mailmesh(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs `mailmesh ARGS` to completion with `env` (see child_env)."""
    return subprocess.run(mailmesh_argv(*args), env=child_env(env), capture_output=True, text=True,
                          timeout=timeout)


def grpc_health(port: int, timeout: float = 2.0, host: str = "127.0.0.1") -> str:
    """The standard gRPC health answer for service "": SERVING, NOT_SERVING... or UNREACHABLE."""
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=timeout)
        except grpc.RpcError:
            return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def leftovers(marker: str) -> list[str]:
    """Processes (other than this one) whose command line or environment mentions `marker`."""
    found = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        for part in ("cmdline", "environ"):
            try:
                data = (entry / part).read_bytes()
            except OSError:
                continue
            if needle in data:
                try:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    cmd = "?"
                found.append(f"{entry.name}: {cmd}")
                break
    return found


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Polls `predicate` every 0.1 s; fails the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


class MeshProcess:
    """A running `mailmesh up --data-dir DATA_DIR` with `env`; output collected in the background."""

    def __init__(self, data_dir: Path, env: dict[str, str], *args: str) -> None:
        self.data_dir = data_dir
        self.env = env
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.up = threading.Event()
        self.proc = subprocess.Popen(mailmesh_argv("up", "--data-dir", str(data_dir), *args), env=child_env(env),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, sink, watch in ((self.proc.stdout, self.stdout, True), (self.proc.stderr, self.stderr, False)):
            threading.Thread(target=self._read, args=(stream, sink, watch), daemon=True).start()

    def _read(self, stream: IO[str], sink: list[str], watch: bool) -> None:
        for line in stream:
            sink.append(line)
            if watch and "mailmesh is up" in line:
                self.up.set()

    def port(self, var: str) -> int:
        """The port in `env[var]`, e.g. port("MAILMESH_MAILBOX_PORT")."""
        return int(self.env[var])

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.port('MAILMESH_NATS_PORT')}"

    def wait_up(self, timeout: float = 45) -> None:
        """Blocks until it printed "mailmesh is up"; fails the test with its output otherwise."""
        deadline = time.monotonic() + timeout
        while not self.up.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mailmesh up did not come up (rc={self.proc.poll()}):\n"
                            f"{''.join(self.stdout)}\n{''.join(self.stderr)}")

    def pids(self) -> dict[str, int | None]:
        """component -> pid, from DATA_DIR/pids.json (kept current by the supervisor)."""
        try:
            return dict(json.loads((self.data_dir / "pids.json").read_text()))
        except (OSError, ValueError):
            return {}

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 20 s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture
def mesh_settings(tmp_path: Path) -> dict[str, str]:
    """MAILMESH_* environment for a mesh: all ten ports free, data dir `tmp_path/data`."""
    return mesh_env(tmp_path / "data")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[str]:
    """A real nats-server with JetStream (file store, fsync always) under `tmp_path/nats`;
    yields its URL once JetStream answers; killed (with its process group) at teardown."""
    server = NatsServer(tmp_path / "nats", "127.0.0.1", free_port())
    url = server.start_and_wait(timeout_s=20)
    try:
        yield url
    finally:
        server.stop(timeout_s=5)


@pytest.fixture(scope="module")
def mailmesh_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    """The whole mesh (`mailmesh up`) on free ports, shared by the tests of one module; stopped
    at the module's end (a test may stop it: later ones then fail). `.env` holds its MAILMESH_*
    settings, `.data_dir` its data, `.pids()` its processes."""
    data_dir = tmp_path_factory.mktemp("mesh") / "data"
    m = MeshProcess(data_dir, mesh_env(data_dir))
    try:
        m.wait_up()
        yield m
    finally:
        m.stop()


# --- spans ----------------------------------------------------------------------------------------

_SPANS = InMemorySpanExporter()
_spans_attached: list[bool] = []


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """Spans finished in this process from now on: one exporter for the whole session, attached
    to whichever tracer provider the process has (installing the default one if none yet)."""
    provider = telemetry.setup_telemetry("tests")
    if not _spans_attached:
        provider.add_span_processor(SimpleSpanProcessor(_SPANS))
        _spans_attached.append(True)
    _SPANS.clear()
    return _SPANS


# --- waiting --------------------------------------------------------------------------------------

T = TypeVar("T")


async def wait_for(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 30.0) -> T:
    """Awaits `check()` until it returns something truthy, and returns that; fails the test naming
    `what` after `timeout` seconds (a bound, never an assertion about speed)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)
