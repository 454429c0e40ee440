"""Virus scanning with clamd over its INSTREAM protocol (clamd(8), "INSTREAM").

The stream is sent as chunks, each prefixed with its length as a 4-byte big-endian integer, and
ended by a zero-length chunk; clamd answers `stream: OK`, `stream: <name> FOUND`, or
`... ERROR`. The address is a unix socket path (`/run/clamav/clamd.ctl`, `unix:/path`) or
`host:port` for TCP. Any failure to get an answer is ScannerUnavailable.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass

from mailmesh_common.errors import Unavailable

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
_MAX_REPLY = 4096


class ScannerUnavailable(Unavailable):
    """clamd could not be reached or gave no usable answer."""


@dataclass(frozen=True)
class ScanResult:
    """clean, or infected with the named signature."""

    infected: bool
    signature: str = ""


def parse_address(address: str) -> tuple[str, int]:
    """(unix socket path, 0) or (host, port)."""
    if address.startswith("unix:"):
        return address.removeprefix("unix:"), 0
    if address.startswith(("/", ".")):
        return address, 0
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"clamd address must be a unix socket path or host:port, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class ClamdScanner:
    """A clamd client; one connection per scan (clamd serves each on its own thread)."""

    def __init__(self, address: str, timeout_s: float = 30.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._where, self._port = parse_address(address)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            if not self._port:
                return await asyncio.wait_for(asyncio.open_unix_connection(self._where), self.timeout_s)
            return await asyncio.wait_for(asyncio.open_connection(self._where, self._port), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            raise ScannerUnavailable(f"clamd not reachable: {exc.__class__.__name__}") from exc

    async def _command(self, command: bytes, payload: bytes | None) -> str:
        reader, writer = await self._connect()
        try:
            async with asyncio.timeout(self.timeout_s):
                writer.write(b"z" + command + b"\0")
                if payload is not None:
                    view = memoryview(payload)
                    for start in range(0, len(view), CHUNK):
                        chunk = view[start:start + CHUNK]
                        writer.write(struct.pack("!I", len(chunk)))
                        writer.write(chunk)
                        await writer.drain()
                    writer.write(struct.pack("!I", 0))
                await writer.drain()
                reply = await reader.readuntil(b"\0")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise ScannerUnavailable(f"clamd gave no answer: {exc.__class__.__name__}") from exc
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        return reply[:_MAX_REPLY].rstrip(b"\0").decode("utf-8", "replace").strip()

    async def ping(self) -> bool:
        try:
            return await self._command(b"PING", None) == "PONG"
        except ScannerUnavailable:
            return False

    async def scan(self, data: bytes) -> ScanResult:
        """Scans data; ScannerUnavailable when clamd cannot give a verdict."""
        reply = await self._command(b"INSTREAM", data)
        # "stream: OK" | "stream: Eicar-Signature FOUND" | "INSTREAM size limit exceeded. ERROR"
        _, _, verdict = reply.partition(": ")
        if verdict == "OK":
            return ScanResult(False)
        if verdict.endswith(" FOUND"):
            return ScanResult(True, verdict.removesuffix(" FOUND").strip()[:200])
        log.warning("clamd could not scan a message: %s", reply[:200])
        raise ScannerUnavailable("clamd could not scan the message")
