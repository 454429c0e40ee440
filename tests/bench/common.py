"""Helpers every benchmark script shares."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of values."""
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def summary(seconds: list[float]) -> dict[str, float | None]:
    """p50 and p99 of durations in seconds, as milliseconds (None when there are none)."""
    if not seconds:
        return {"p50": None, "p99": None}
    return {"p50": round(statistics.median(seconds) * 1000, 1), "p99": round(pct(seconds, 99) * 1000, 1)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time (every thread) a process used so far (Linux /proc; 0 elsewhere).
    On a machine shared with other work, CPU per message is steadier than messages per second."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Waits until something listens on 127.0.0.1:port; fails if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError(f"port {port} not listening after {timeout}s")
