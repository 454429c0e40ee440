"""DNS blocklists of SMTP clients (RFC 5782), such as zen.spamhaus.org: the client's address,
reversed (IPv4 octets, IPv6 nibbles), looked up as an A record under each configured zone.

An address is listed when an answer is in 127.0.0.0/8, except 127.255.255.0/24: Spamhaus and
others answer there to say the query was refused (a public resolver, a quota), which must never
block mail. No answer, a temporary DNS failure or a timeout is "not listed" (logged): an
unreachable list must not stop the mail, as with Postfix's reject_rbl_client. The zones of one
client are asked concurrently and the whole check is bounded by a short timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence

from mailmesh_common import telemetry
from mailmesh_common.dns import Resolver
from mailmesh_common.errors import MailmeshError

log = logging.getLogger(__name__)

DNSBL_TIMEOUT_S = 5.0
_LISTED = ipaddress.ip_network("127.0.0.0/8")
_REFUSED = ipaddress.ip_network("127.255.255.0/24")


def query_name(ip: str, zone: str) -> str | None:
    """The name to look up for ip in zone (RFC 5782 2.1, 2.4), or None for no IP address."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d
    if isinstance(addr, ipaddress.IPv4Address):
        labels = list(reversed(str(addr).split(".")))
    else:
        labels = list(reversed(addr.exploded.replace(":", "")))
    return ".".join([*labels, zone.strip().strip(".")])


def is_listing(answer: str) -> bool:
    """Whether an A record answered by a blocklist says "listed" (module doc)."""
    try:
        addr = ipaddress.ip_address(answer)
    except ValueError:
        return False
    return addr in _LISTED and addr not in _REFUSED


async def listing_zone(resolver: Resolver, ip: str, zones: Sequence[str], *,
                       timeout_s: float = DNSBL_TIMEOUT_S) -> str:
    """The first of zones (in their order) that lists ip, or "" (module doc)."""
    names = [(zone, query_name(ip, zone)) for zone in zones if zone.strip()]
    asked = [(zone, name) for zone, name in names if name is not None]
    if not asked:
        return ""
    with telemetry.tracer("svc_ingest.dnsbl").start_as_current_span(
            "dns.dnsbl", attributes={"network.peer.address": ip}) as span:
        try:
            answers = await asyncio.wait_for(
                asyncio.gather(*(resolver.a(name) for _, name in asked), return_exceptions=True), timeout_s)
        except TimeoutError:
            log.warning("DNS blocklists did not answer for %s within %.1fs; not blocking", ip, timeout_s)
            return ""
        for (zone, _), answer in zip(asked, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, MailmeshError):
                    raise answer
                log.warning("DNS blocklist %s failed for %s: %s; not blocking", zone, ip, answer.message)
                continue
            if any(is_listing(a) for a in answer):
                span.set_attribute("mailmesh.dnsbl.zone", zone)
                return zone
            refused = [a for a in answer if not is_listing(a)]
            if refused:
                log.warning("DNS blocklist %s answered %s for %s (not a listing: query refused?)",
                            zone, ",".join(refused[:3]), ip)
        return ""


__all__ = ["DNSBL_TIMEOUT_S", "is_listing", "listing_zone", "query_name"]
