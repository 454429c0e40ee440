"""A real authoritative DNS server for tests: dnslib on 127.0.0.1, UDP and TCP on one free port,
answering from zone data the test sets at run time. Point MAILMESH_DNS_SERVERS (or a Resolver)
at `server.address`.

    server.add("example.com", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    server.add("example.com", "MX", (10, "mx.example.com"))
    server.fail("broken.example", "servfail")        # or "timeout" (no answer at all)

Types: A, AAAA, MX ((pref, host) or "pref host"; host "." is a null MX), TXT and SPF (a str or
bytes, split into 255-byte strings when longer, or a list of explicit strings), PTR, CNAME
(followed within the zone, loops included as a real server would answer them). Names are
matched case-insensitively; a name without records but with records below it answers NODATA,
anything else NXDOMAIN. UDP answers larger than the client's EDNS size (512 without EDNS) are
truncated, so clients retry over TCP.

Use as fixtures: `from tests.dnsserver import dns_server` (function scope) or
`module_dns_server`; both yield a started DnsServer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSError, DNSLabel, DNSRecord
from dnslib.server import DNSHandler, DNSLogger
from dnslib.server import DNSServer as _DnslibServer

TYPES = ("A", "AAAA", "MX", "TXT", "SPF", "PTR", "CNAME")
MAX_CHAIN = 16


class _Drop(DNSError):
    """Raised by the resolver to send no answer at all (dnslib's handler swallows DNSError)."""


@dataclass(frozen=True)
class _Record:
    rtype: str
    rr: RR


def _txt_strings(value: Any) -> list[bytes]:
    if isinstance(value, (list, tuple)):
        return [v.encode() if isinstance(v, str) else bytes(v) for v in value]
    data = value.encode() if isinstance(value, str) else bytes(value)
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


def _rdata(rtype: str, value: Any) -> Any:
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "MX":
        if isinstance(value, str):
            pref, _, host = value.strip().partition(" ")
            value = (int(pref), host.strip())
        pref, host = value
        return MX(host, int(pref))
    if rtype in ("TXT", "SPF"):
        return TXT(_txt_strings(value))
    if rtype == "PTR":
        return PTR(value)
    if rtype == "CNAME":
        return CNAME(value)
    raise ValueError(f"unsupported record type {rtype!r}")


def _key(name: str) -> str:
    """The lookup form of a name: presentation format as dnslib prints it, lowercased."""
    return str(DNSLabel(name.strip())).rstrip(".").lower()


class _ZoneResolver:
    """dnslib resolver over the server's zone (read under its lock)."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        qname = _key(str(request.q.qname))
        qtype = QTYPE.get(request.q.qtype)
        proto = getattr(handler, "protocol", "udp")
        with self.server._lock:
            zone = self.server._zone
            fails = self.server._fails
            self.server.queries.append((qname, qtype, proto))
        mode = fails.get((qname, qtype)) or fails.get((qname, None))
        if mode == "timeout":
            if proto == "tcp":  # keep the connection open until the client gives up
                self.server._stopping.wait(10)
            raise _Drop("simulated timeout")
        reply = request.reply()
        if mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        name, seen = qname, {qname}
        for _ in range(MAX_CHAIN):
            records = zone.get(name, [])
            cname = [r for r in records if r.rtype == "CNAME"]
            if cname and qtype != "CNAME":
                reply.add_answer(cname[0].rr)
                name = _key(str(cname[0].rr.rdata.label))
                if name in seen:  # a loop: answer the chain as far as it goes
                    break
                seen.add(name)
                continue
            for r in records:
                if r.rtype == qtype or qtype == "ANY":
                    reply.add_answer(r.rr)
            break
        if not reply.rr and not self.server._exists(qname, zone):
            reply.header.rcode = RCODE.NXDOMAIN
        # RFC 6891: a UDP answer fits the client's EDNS payload size (512 without EDNS); a larger
        # one goes out as header and question with TC set (RFC 2181 9), and the client retries
        # over TCP. (dnslib's own truncation drops the question, which clients then ignore.)
        handler.udplen = 0
        opt = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
        limit = max(512, int(opt[0].rclass)) if opt else 512
        if proto == "udp" and len(reply.pack()) > limit:
            reply = request.reply()
            reply.header.tc = 1
        return reply


class DnsServer:
    """An authoritative DNS server on 127.0.0.1 (UDP + TCP, same port); see the module doc."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str, str]] = []  # (name, type, "udp"|"tcp") asked so far
        self._lock = threading.Lock()
        self._zone: dict[str, list[_Record]] = {}
        self._fails: dict[tuple[str, str | None], str] = {}
        self._stopping = threading.Event()
        self._servers: list[_DnslibServer] = []

    @property
    def address(self) -> str:
        """ "127.0.0.1:PORT", the form MAILMESH_DNS_SERVERS takes."""
        return f"{self.host}:{self.port}"

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> DnsServer:
        resolver = _ZoneResolver(self)
        logger = DNSLogger(logf=lambda _msg: None)
        for _ in range(50):
            udp = _DnslibServer(resolver, address=self.host, port=0, logger=logger)
            port = int(udp.server.server_address[1])
            try:
                tcp = _DnslibServer(resolver, address=self.host, port=port, tcp=True, logger=logger)
            except OSError:
                udp.server.server_close()
                continue
            self.port = port
            self._servers = [udp, tcp]
            break
        else:  # pragma: no cover
            raise RuntimeError("no port free for both UDP and TCP")
        for server in self._servers:  # a short poll keeps stop() quick
            threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.02},
                             name=f"dns-{self.port}", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        for server in self._servers:
            server.server.shutdown()
            server.server.server_close()
        self._servers = []

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- zone data ----------------------------------------------------------------------------

    def add(self, name: str, rtype: str, value: Any, ttl: int = 60) -> None:
        """One record; `value` as described in the module doc."""
        rtype = rtype.upper()
        rr = RR(DNSLabel(name.strip()), getattr(QTYPE, rtype), rdata=_rdata(rtype, value), ttl=ttl)
        with self._lock:
            zone = dict(self._zone)
            zone[_key(name)] = [*zone.get(_key(name), []), _Record(rtype, rr)]
            self._zone = zone

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Drops the records of `name` (only those of `rtype` when given)."""
        with self._lock:
            zone = dict(self._zone)
            kept = [r for r in zone.get(_key(name), []) if rtype is not None and r.rtype != rtype.upper()]
            if kept:
                zone[_key(name)] = kept
            else:
                zone.pop(_key(name), None)
            self._zone = zone

    def set_zone(self, zone: Mapping[str, Iterable[tuple[str, Any]]]) -> None:
        """Replaces all data: {name: [(type, value), ...]}; failures are cleared too."""
        self.clear()
        for name, records in zone.items():
            for rtype, value in records:
                self.add(name, rtype, value)

    def fail(self, name: str, mode: str = "servfail", rtype: str | None = None) -> None:
        """Questions for `name` (of `rtype`, or any type) get SERVFAIL or, for "timeout", nothing."""
        if mode not in ("servfail", "timeout"):
            raise ValueError("mode is 'servfail' or 'timeout'")
        with self._lock:
            self._fails = {**self._fails, (_key(name), rtype.upper() if rtype else None): mode}

    def clear(self) -> None:
        """Forgets every record, failure and logged query."""
        with self._lock:
            self._zone = {}
            self._fails = {}
            self.queries = []

    @staticmethod
    def _exists(name: str, zone: Mapping[str, Sequence[_Record]]) -> bool:
        """RFC 8020: a name exists when it has records or names below it (empty non-terminal)."""
        if zone.get(name):
            return True
        suffix = "." + name
        return any(other.endswith(suffix) for other in zone)


def _serve() -> Iterator[DnsServer]:
    server = DnsServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A started DnsServer with an empty zone, for one test."""
    yield from _serve()


@pytest.fixture(scope="module")
def module_dns_server() -> Iterator[DnsServer]:
    """A started DnsServer shared by one module's tests (call `.clear()` between uses)."""
    yield from _serve()


__all__ = ["DnsServer", "dns_server", "module_dns_server", "TYPES"]
