"""Per client IP limits of the SMTP listener: concurrent connections (421 4.7.0 past the limit)
and messages per minute (451 4.7.1 at MAIL FROM past the limit).

Both are in memory, per process: each svc_ingest replica enforces its own share. A limit of 0
means unlimited. Memory is bounded: idle entries are dropped. An IPv6 client is counted by its
/64: a site is given at least a /64 and can send from any address in it, so per-address limits
would not hold it (IPv4-mapped addresses count as the IPv4 address).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mailmesh_common.address import client_key
from mailmesh_common.limits import ConnectionLimiter


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per IP: `per_minute` messages of burst, refilled at per_minute/60 a second."""

    MAX_TRACKED = 100_000  # IPs remembered at once; full buckets are forgotten first

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _refill(self, b: _Bucket, now: float) -> None:
        b.tokens = min(float(self.per_minute), b.tokens + (now - b.updated) * self.per_minute / 60.0)
        b.updated = now

    def allow(self, ip: str) -> bool:
        """Takes one message from ip's budget; False when it is spent."""
        if not self.per_minute:
            return True
        ip = client_key(ip)
        now = self.clock()
        b = self._buckets.get(ip)
        if b is None:
            if len(self._buckets) >= self.MAX_TRACKED:
                self._prune(now)
            b = self._buckets[ip] = _Bucket(float(self.per_minute), now)
        else:
            self._refill(b, now)
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True

    def _prune(self, now: float) -> None:
        for ip, b in list(self._buckets.items()):
            self._refill(b, now)
            if b.tokens >= self.per_minute:
                del self._buckets[ip]
        if len(self._buckets) >= self.MAX_TRACKED:  # everyone is busy: forget the oldest half
            for ip in list(self._buckets)[: self.MAX_TRACKED // 2]:
                del self._buckets[ip]


class Limits:
    """The listener's limits, built from settings."""

    def __init__(self, max_connections_per_ip: int, messages_per_minute_per_ip: int) -> None:
        self.connections = ConnectionLimiter(max_connections_per_ip)
        self.rate = RateLimiter(messages_per_minute_per_ip)
