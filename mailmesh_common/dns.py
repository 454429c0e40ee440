"""The one DNS resolver of mailmesh: MX for delivery and SPF, DKIM and DMARC records for ingest
all go through it, to the servers in MAILMESH_DNS_SERVERS ("127.0.0.1:5353", "::1",
"[::1]:53", comma-separated) or, when that is empty, those of the system's resolv.conf.

Async methods serve service code (dnspython's asyncresolver); `sync_*` twins serve libraries
that call back synchronously from a worker thread (pyspf, dkimpy). Both share one LRU cache
bounded in entries, which honours TTLs (negative answers included).

Errors: a name or type that does not exist is an empty list (`lookup(..., missing_ok=False)`
raises DnsNotFound, telling NXDOMAIN from NODATA); SERVFAIL, REFUSED, timeouts and answers that
cannot be parsed raise DnsTempError, an Unavailable (SMTP 451 4.3.0, gRPC UNAVAILABLE). A name
that cannot exist in the DNS (empty or over-long label) and a CNAME loop count as not found.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename

from mailmesh_common.errors import ConfigError, InvalidInput, MailmeshError, Unavailable

if TYPE_CHECKING:
    from mailmesh_common.config import Settings

DEFAULT_CACHE_ENTRIES = 4096
RdType = str | dns.rdatatype.RdataType


class DnsTempError(Unavailable):
    """SERVFAIL, timeout or an unusable answer: the same question may succeed later."""


class DnsNotFound(MailmeshError):
    """The name does not exist (NXDOMAIN) or has no records of the type asked (NODATA)."""

    def __init__(self, name: str, rdtype: str, *, nxdomain: bool) -> None:
        super().__init__(f"{name}/{rdtype}: {'no such name' if nxdomain else 'no records'}")
        self.name = name
        self.rdtype = rdtype
        self.nxdomain = nxdomain


def parse_server(spec: str) -> tuple[str, int]:
    """("127.0.0.1", 5353) from "127.0.0.1:5353"; port 53 when absent; IPv6 as "::1" or "[::1]:53"."""
    text = spec.strip()
    host, port = text, 53
    try:
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError
                port = int(rest[1:])
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
            port = int(port_text)
        ipaddress.ip_address(host)
        if not 0 < port <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"dns_servers: expected IP or IP:port, got {spec!r}") from None
    return host, port


def _configure(resolver: dns.resolver.BaseResolver, servers: Sequence[tuple[str, int]],
               timeout_s: float, lifetime_s: float, cache: dns.resolver.LRUCache | None) -> None:
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    resolver.timeout = timeout_s
    resolver.lifetime = lifetime_s
    resolver.cache = cache
    # RFC 6891: 1232 bytes keeps answers unfragmented; larger ones come over TCP (TC bit)
    resolver.use_edns(0, 0, 1232)


@functools.lru_cache(maxsize=DEFAULT_CACHE_ENTRIES)  # names repeat (_dmarc.<domain>); a Name is immutable
def _qname(name: str) -> dns.name.Name | None:
    """The absolute name, or None when `name` cannot exist in the DNS (bad or over-long label)."""
    try:
        return dns.name.from_text(name.strip())
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return None


def _is_cname_loop(exc: dns.resolver.NoNameservers) -> bool:
    errors = exc.kwargs.get("errors") or []
    return bool(errors) and all(isinstance(err[3], dns.message.ChainTooLong) for err in errors)


def _name_text(name: dns.name.Name) -> str:
    """A target name without the final dot, lowercased; the root (null MX, RFC 7505) is ""."""
    if name == dns.name.root:
        return ""
    return str(name.to_text(omit_final_dot=True)).lower()


class Resolver:
    """DNS through the configured servers with a bounded, shared cache (see module doc)."""

    def __init__(self, servers: Sequence[str] = (), timeout_s: float = 5.0, lifetime_s: float = 10.0,
                 *, cache_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        parsed = [parse_server(s) for s in servers if s.strip()]
        self.servers = tuple(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in parsed)
        self.cache = dns.resolver.LRUCache(cache_entries) if cache_entries > 0 else None
        try:
            self._async = dns.asyncresolver.Resolver(configure=not parsed)
            self._sync = dns.resolver.Resolver(configure=not parsed)
        except dns.resolver.NoResolverConfiguration:
            raise ConfigError("dns_servers: empty and the system has no usable resolv.conf") from None
        for r in (self._async, self._sync):
            _configure(r, parsed, timeout_s, lifetime_s, self.cache)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> Resolver:
        """The resolver of MAILMESH_DNS_SERVERS (system resolv.conf when empty)."""
        return cls(settings.dns_servers, **kwargs)

    def __repr__(self) -> str:
        return f"Resolver({list(self.servers) or 'resolv.conf'})"

    # --- the raw lookup -----------------------------------------------------------------------

    async def lookup(self, name: str, rdtype: RdType, *, missing_ok: bool = True) -> list[Any]:
        """The rdata of `name`/`rdtype` (dnspython objects); [] or DnsNotFound when absent."""
        qname = _qname(name)
        if qname is None:
            return self._missing(name, rdtype, True, missing_ok)
        cached = self._cached(qname, rdtype)
        if cached is not None:
            rdatas, nxdomain = cached
            return rdatas if rdatas else self._missing(name, rdtype, nxdomain, missing_ok)
        try:
            answer = await self._async.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.exception.DNSException as exc:
            return self._failed(name, rdtype, exc, missing_ok)
        if answer.rrset is None:
            return self._missing(name, rdtype, False, missing_ok)
        return list(answer.rrset)

    def _cached(self, qname: dns.name.Name, rdtype: RdType) -> tuple[list[Any], bool] | None:
        """(rdata, name does not exist) from the cache, None when it has no answer: what
        dnspython's resolve would find there first, without setting up a resolution (the
        cache-hit path is most lookups on ingest's message path)."""
        cache = self.cache
        if cache is None:
            return None
        answer = cache.get((qname, dns.rdatatype.RdataType.make(rdtype), dns.rdataclass.IN))
        if answer is not None:
            return ([] if answer.rrset is None else list(answer.rrset)), False
        # a name that does not exist is cached under the ANY type (as in dnspython's resolve)
        answer = cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
        if answer is not None and answer.response.rcode() == dns.rcode.NXDOMAIN:
            return [], True
        return None

    def sync_lookup(self, name: str, rdtype: RdType, *, missing_ok: bool = True) -> list[Any]:
        """`lookup` for synchronous callers in a worker thread (never on the event loop)."""
        return self._sync_lookup(name, rdtype, missing_ok)[0]

    def sync_lookup_valid_until(self, name: str, rdtype: RdType) -> tuple[list[Any], float]:
        """`sync_lookup` (absent: []) and the time (time.time()) until which that answer stands:
        when its TTL, or the negative TTL of a name or type that does not exist (RFC 2308), runs
        out of the shared cache. 0.0 when that is not known (no cache, a CNAME loop); inf for a
        name that cannot exist in the DNS. For callers that keep results derived from answers
        (SPF verdicts) no longer than the answers themselves."""
        return self._sync_lookup(name, rdtype, True)

    def _sync_lookup(self, name: str, rdtype: RdType, missing_ok: bool) -> tuple[list[Any], float]:
        qname = _qname(name)
        if qname is None:
            return self._missing(name, rdtype, True, missing_ok), math.inf
        cache = self.cache
        try:
            answer = self._sync.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.exception.DNSException as exc:
            until = 0.0
            if isinstance(exc, dns.resolver.NXDOMAIN) and cache is not None:
                # dnspython caches a name that does not exist under its ANY type, whatever was asked
                cached = cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
                until = float(cached.expiration) if cached is not None else 0.0
            return self._failed(name, rdtype, exc, missing_ok), until
        until = float(answer.expiration) if cache is not None else 0.0
        if answer.rrset is None:
            return self._missing(name, rdtype, False, missing_ok), until
        return list(answer.rrset), until

    @staticmethod
    def _missing(name: str, rdtype: RdType, nxdomain: bool, missing_ok: bool) -> list[Any]:
        if missing_ok:
            return []
        raise DnsNotFound(name, str(rdtype), nxdomain=nxdomain)

    def _failed(self, name: str, rdtype: RdType, exc: dns.exception.DNSException,
                missing_ok: bool) -> list[Any]:
        if isinstance(exc, (dns.resolver.NXDOMAIN, dns.resolver.YXDOMAIN)):
            return self._missing(name, rdtype, True, missing_ok)
        if isinstance(exc, dns.resolver.NoAnswer):
            return self._missing(name, rdtype, False, missing_ok)
        if isinstance(exc, dns.resolver.NoNameservers) and _is_cname_loop(exc):
            return self._missing(name, rdtype, False, missing_ok)  # RFC 1034 3.6.2: a loop is an error
        if isinstance(exc, dns.exception.Timeout):
            raise DnsTempError(f"DNS timeout looking up {name}/{rdtype}") from exc
        raise DnsTempError(f"DNS failure looking up {name}/{rdtype}: {type(exc).__name__}") from exc

    # --- typed helpers ------------------------------------------------------------------------

    async def txt(self, name: str) -> list[str]:
        """Each TXT record with its strings joined without separator (RFC 7208 3.3)."""
        return [b.decode("utf-8", "replace") for b in await self.txt_bytes(name)]

    async def txt_bytes(self, name: str) -> list[bytes]:
        return [b"".join(r.strings) for r in await self.lookup(name, "TXT")]

    def sync_txt(self, name: str) -> list[str]:
        return [b.decode("utf-8", "replace") for b in self.sync_txt_bytes(name)]

    def sync_txt_bytes(self, name: str) -> list[bytes]:
        return [b"".join(r.strings) for r in self.sync_lookup(name, "TXT")]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, exchange) by preference; a null MX (RFC 7505) is [(0, "")]."""
        return sorted((int(r.preference), _name_text(r.exchange)) for r in await self.lookup(name, "MX"))

    def sync_mx(self, name: str) -> list[tuple[int, str]]:
        return sorted((int(r.preference), _name_text(r.exchange)) for r in self.sync_lookup(name, "MX"))

    async def a(self, name: str) -> list[str]:
        return [str(r.address) for r in await self.lookup(name, "A")]

    async def aaaa(self, name: str) -> list[str]:
        return [str(r.address) for r in await self.lookup(name, "AAAA")]

    async def ptr(self, ip: str) -> list[str]:
        """The names of an address (in-addr.arpa / ip6.arpa)."""
        try:
            rname = dns.reversename.from_address(ip)
        except (dns.exception.SyntaxError, ValueError):
            raise InvalidInput(f"not an IP address: {ip!r}") from None
        return [_name_text(r.target) for r in await self.lookup(rname.to_text(), "PTR")]


__all__ = ["DnsNotFound", "DnsTempError", "Resolver", "parse_server"]
