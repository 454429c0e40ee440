"""Forward-confirmed reverse DNS of the SMTP client (FCrDNS), for the `Received` header's
TCP-info (RFC 5321 4.4: `from helo (name [ip])`).

A PTR name of the client's address counts only when one of its A (AAAA for IPv6) records is
that address again: a PTR alone is whatever the address's owner wants it to say. Lookups go
through the configured resolver (its cache honours TTLs), are bounded by a short timeout, and
never fail a message: no name, a temporary DNS failure or a timeout all give "".
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from mailmesh_common import telemetry
from mailmesh_common.dns import Resolver
from mailmesh_common.errors import MailmeshError

log = logging.getLogger(__name__)

RDNS_TIMEOUT_S = 2.0
MAX_PTR_NAMES = 5  # PTR names of one address checked forward (RFC 7208 4.6.4 bounds the same)
MAX_NAME_CHARS = 253


async def verified_name(resolver: Resolver, ip: str, *, timeout_s: float = RDNS_TIMEOUT_S) -> str:
    """The first PTR name of ip whose forward lookup includes ip, or "" (see module doc)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d
    with telemetry.tracer("svc_ingest.rdns").start_as_current_span(
            "dns.rdns", attributes={"network.peer.address": str(addr)}) as span:
        try:
            name = await asyncio.wait_for(_confirm(resolver, addr), timeout_s)
        except TimeoutError:
            log.info("reverse DNS of %s timed out after %.1fs", addr, timeout_s)
            span.set_attribute("mailmesh.rdns.timeout", True)
            return ""
        except MailmeshError as exc:  # SERVFAIL and the like: the header just has no name
            log.info("reverse DNS of %s failed: %s", addr, exc.message)
            return ""
        span.set_attribute("mailmesh.rdns.name", name)
        return name


async def _confirm(resolver: Resolver, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    names = [n for n in await resolver.ptr(str(addr)) if n and len(n) <= MAX_NAME_CHARS][:MAX_PTR_NAMES]
    if not names:
        return ""
    forward = resolver.a if addr.version == 4 else resolver.aaaa
    found = await asyncio.gather(*(forward(n) for n in names), return_exceptions=True)
    for name, addresses in zip(names, found, strict=True):
        if isinstance(addresses, BaseException):
            if not isinstance(addresses, MailmeshError):
                raise addresses
            continue
        for a in addresses:
            try:
                if ipaddress.ip_address(a) == addr:
                    return name
            except ValueError:
                continue
    return ""
