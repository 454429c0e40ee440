"""SPF (RFC 7208) for inbound mail: the MAIL FROM identity, or the HELO identity when MAIL FROM
is null (RFC 7208 2.4), evaluated by pyspf in a worker thread.

pyspf's evaluator is used as is except for its DNS: `_Query` overrides `query.dns`, pyspf's
single point of DNS access, so every lookup goes through mailmesh's Resolver (its servers, its
cache) and nothing global in pyspf is patched. RFC 7208 processing limits stay pyspf's: 10
DNS-querying terms (4.6.4), 2 void lookups (4.6.4), 10 MX / PTR names (4.6.4); the whole
evaluation gets MAX_EVALUATION_S (4.6.4: "at least 20 seconds") before it is a temperror.

A verdict is remembered per resolver, keyed by everything the evaluation reads (client IP,
MAIL FROM, HELO, receiver), until the first DNS answer it used expires (each answer's TTL, or
negative TTL): within that time a new evaluation would read the same answers from the resolver's
cache and reach the same verdict, so a burst of mail from one sender is evaluated once. Only
verdicts that depend on nothing else are kept: not temperror or permerror, and not one carrying
the domain's own exp= text (it may hold the %{t} time stamp macro, RFC 7208 7.3).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import ipaddress
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import spf as pyspf

from mailmesh_common.dns import DnsTempError, Resolver
from mailmesh_common.errors import InvalidInput

log = logging.getLogger(__name__)

MAX_EVALUATION_S = 20.0
EVALUATION_THREADS = 32  # concurrent evaluations; more wait their turn
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
CACHE_ENTRIES = 10_000  # remembered verdicts per resolver
_CACHEABLE = ("pass", "fail", "softfail", "neutral", "none")


@dataclass(frozen=True)
class SpfResult:
    """One SPF verdict (RFC 7208 2.6) for the identity checked."""

    result: str  # pass|fail|softfail|neutral|none|temperror|permerror
    domain: str  # the domain checked: the MAIL FROM domain, or the HELO name
    scope: str  # "mailfrom" or "helo"
    explanation: str = ""  # pyspf's text: the domain's exp= for fail, else what went wrong


def _rdata_for_pyspf(qtype: str, rdata: Any) -> Any:
    """dnspython rdata in the shapes pyspf's own dnspython driver produces."""
    if qtype in ("A", "AAAA"):
        return str(rdata.address)
    if qtype == "MX":
        exchange = rdata.exchange.to_text(omit_final_dot=True) if len(rdata.exchange) > 1 else ""
        return (int(rdata.preference), exchange)
    if qtype in ("PTR", "CNAME"):
        return rdata.target.to_text(omit_final_dot=True)
    if qtype in ("TXT", "SPF"):
        return tuple(rdata.strings)  # bytes: pyspf joins them (RFC 7208 3.3) and checks ASCII
    return rdata.to_text()


class _Query(pyspf.query):  # type: ignore[misc]
    """pyspf's query whose DNS is mailmesh's Resolver (sync side, in the worker thread)."""

    def __init__(self, resolver: Resolver, deadline: float, **kwargs: Any) -> None:
        self._resolver = resolver
        self._deadline = deadline
        self.valid_until = math.inf  # when the first DNS answer used so far expires
        super().__init__(**kwargs)

    def dns(self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False) -> list[Any]:
        """pyspf's `query.dns` contract: a list of values, [] when none; CNAMEs are followed by
        the resolver; void lookups counted as RFC 7208 4.6.4 says; DNS trouble is TempError."""
        name = str(name or "")
        if name.endswith("."):
            name = name[:-1]
        if not name or not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # not a valid DNS name (RFC 7208 4.3): no data, not a void lookup
        name = name.lower()
        key = (name, qtype)
        result: list[Any] | None = self.cache.get(key)
        if result is None:
            if time.monotonic() > self._deadline:
                raise pyspf.TempError("DNS Error: exceeded max query lookup time")
            try:
                rdatas, until = self._resolver.sync_lookup_valid_until(name, qtype)
            except DnsTempError as exc:
                raise pyspf.TempError(f"DNS {exc.message}") from None
            self.valid_until = min(self.valid_until, until)
            result = [_rdata_for_pyspf(qtype, r) for r in rdatas]
            self.cache[key] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > pyspf.MAX_VOID_LOOKUPS:
                raise pyspf.PermError(f"Void lookup limit of {pyspf.MAX_VOID_LOOKUPS} exceeded")
        return result


@functools.lru_cache(maxsize=1)
def _executor() -> ThreadPoolExecutor:
    """SPF's own threads: an evaluation may wait on DNS for up to MAX_EVALUATION_S, and must not
    starve the default executor that other work (blob writes) shares."""
    return ThreadPoolExecutor(max_workers=EVALUATION_THREADS, thread_name_prefix="spf")


def _client_ip(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        raise InvalidInput(f"not an IP address: {ip!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:192.0.2.1 from a dual-stack socket is an IPv4 client
    return str(addr)


_Key = tuple[str, str, str, str]  # client IP, sender, HELO, receiver


class _Verdicts:
    """The remembered verdicts of one resolver (module doc), least recently used dropped first."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.entries = entries
        self._lock = threading.Lock()  # resolvers may be shared by event loops in several threads
        self._data: OrderedDict[_Key, tuple[float, str, str]] = OrderedDict()

    def get(self, key: _Key) -> tuple[str, str] | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            if time.time() >= hit[0]:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return hit[1], hit[2]

    def put(self, key: _Key, valid_until: float, result: str, explanation: str) -> None:
        if self.entries <= 0 or result not in _CACHEABLE or explanation != pyspf.EXPLANATIONS.get(result) \
                or valid_until <= time.time():
            return
        with self._lock:
            self._data[key] = (valid_until, result, explanation)
            self._data.move_to_end(key)
            while len(self._data) > self.entries:
                self._data.popitem(last=False)


_VERDICTS: weakref.WeakKeyDictionary[Resolver, _Verdicts] = weakref.WeakKeyDictionary()


def _verdicts(resolver: Resolver) -> _Verdicts:
    found = _VERDICTS.get(resolver)
    if found is None:
        found = _VERDICTS.setdefault(resolver, _Verdicts())
    return found


def _evaluate(resolver: Resolver, ip: str, sender: str, helo: str, receiver: str) -> tuple[str, str, float]:
    query = _Query(resolver, time.monotonic() + MAX_EVALUATION_S,
                   i=ip, s=sender, h=helo, receiver=receiver, strict=True)
    if sender.count("@") > 1:
        # pyspf splits at the first "@", but a quoted local part may hold one ("a@x"@example.com):
        # the domain evaluated must be the one reported (and aligned by DMARC), after the last
        local, _, domain = sender.rpartition("@")
        query.l, query.o, query.d = local, domain, domain
    result, _code, explanation = query.check()
    return str(result), str(explanation or ""), query.valid_until


async def check_spf(resolver: Resolver, ip: str, mail_from: str, helo: str, *,
                    receiver: str = "") -> SpfResult:
    """SPF for a client at `ip` saying HELO `helo` and MAIL FROM `mail_from` ("" or "<>" when
    null, then the HELO identity is checked). `receiver` fills the %{r} macro (RFC 7208 7.3)."""
    client = _client_ip(ip)
    sender = mail_from.strip()
    if sender.startswith("<") and sender.endswith(">"):
        sender = sender[1:-1].strip()
    helo = helo.strip()
    if sender:
        scope = "mailfrom"
        domain = sender.rpartition("@")[2]  # no "@": the whole path is the domain (pyspf too)
    else:
        scope = "helo"
        domain = helo
    domain = domain.rstrip(".").lower()
    if not domain:
        return SpfResult("none", "", scope, "no identity to check")
    receiver = receiver or "unknown"
    key = (client, sender, helo, receiver)
    verdicts = _verdicts(resolver)
    known = verdicts.get(key)
    if known is not None:
        return SpfResult(known[0], domain, scope, known[1])
    loop = asyncio.get_running_loop()
    job = functools.partial(contextvars.copy_context().run, _evaluate, resolver, client, sender, helo, receiver)
    try:
        result, explanation, valid_until = await loop.run_in_executor(_executor(), job)
    except Exception:  # a record pyspf cannot digest is the domain's problem, not a crash
        log.exception("SPF evaluation failed for %s", domain)
        result, explanation, valid_until = "permerror", "SPF evaluation error", 0.0
    verdicts.put(key, valid_until, result, explanation)
    if result not in RESULTS:
        result = "permerror"
    return SpfResult(result, domain, scope, explanation)


__all__ = ["SpfResult", "check_spf"]
