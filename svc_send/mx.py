"""Where mail for a domain goes (RFC 5321 5.1): its MX hosts by preference (equal preferences
shuffled), each with its addresses; no MX record at all means the domain itself is the one host
(the implicit MX); a null MX (RFC 7505) means the domain accepts no mail. Lookups go through
the one resolver of mailmesh (mailmesh_common.dns)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from mailmesh_common.dns import DnsNotFound, DnsTempError, Resolver
from mailmesh_common.errors import MailmeshError

MAX_MX_HOSTS = 10


class NoMailDomain(MailmeshError):
    """The domain cannot receive mail: permanent. `reply` is the SMTP-style reason."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class RouteTempError(MailmeshError):
    """The route cannot be known now (DNS trouble): try again later."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass
class Host:
    """One mail server of a domain."""

    name: str
    preference: int
    addresses: list[str] = field(default_factory=list)


async def _addresses(resolver: Resolver, name: str) -> tuple[list[str], bool]:
    """(IPv4 then IPv6 addresses of name, a lookup failed temporarily)."""
    out: list[str] = []
    temp = False
    for lookup in (resolver.a, resolver.aaaa):
        try:
            out.extend(await lookup(name))
        except DnsTempError:
            temp = True
    return out, temp


async def resolve(resolver: Resolver, domain: str) -> list[Host]:
    """The hosts to try, in order. Raises NoMailDomain (permanent) or RouteTempError."""
    try:
        records = await resolver.lookup(domain, "MX", missing_ok=False)
    except DnsNotFound as exc:
        if exc.nxdomain:
            raise NoMailDomain(f"550 5.1.2 the domain {domain} does not exist") from None
        records = []
    except DnsTempError:
        raise RouteTempError(f"451 4.4.3 DNS lookup of the MX records of {domain} failed") from None
    mx = [(int(r.preference), str(r.exchange.to_text(omit_final_dot=True)).lower()) for r in records]
    if any(name in ("", ".") for _, name in mx):  # RFC 7505 3: a null MX
        raise NoMailDomain(f"556 5.1.10 the domain {domain} accepts no mail (null MX, RFC 7505)")
    if not mx:  # RFC 5321 5.1: the implicit MX
        addrs, temp = await _addresses(resolver, domain)
        if addrs:
            return [Host(domain, 0, addrs)]
        if temp:
            raise RouteTempError(f"451 4.4.3 DNS lookup of the addresses of {domain} failed")
        raise NoMailDomain(f"550 5.1.2 the domain {domain} has no mail server (no MX, A or AAAA record)")
    by_pref: dict[int, list[str]] = {}
    for pref, name in mx:
        by_pref.setdefault(pref, []).append(name)
    hosts: list[Host] = []
    any_temp = False
    for pref in sorted(by_pref):
        names = by_pref[pref]
        random.shuffle(names)  # RFC 5321 5.1: spread the load over equal preferences
        for name in names:
            if len(hosts) >= MAX_MX_HOSTS:
                break
            addrs, temp = await _addresses(resolver, name)
            any_temp = any_temp or temp
            if addrs:
                hosts.append(Host(name, pref, addrs))
    if hosts:
        return hosts
    if any_temp:
        raise RouteTempError(f"451 4.4.3 DNS lookup of the mail servers of {domain} failed")
    raise RouteTempError(f"451 4.4.4 no mail server of {domain} has an address")


__all__ = ["Host", "NoMailDomain", "RouteTempError", "resolve"]
