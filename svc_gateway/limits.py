"""Per-user request and search rate limits (token buckets, in the memory of one gateway replica,
bounded in size) and failed-login counters per account and per client IP (an IPv6 client by its /64), which live in the
gateway's KV store so that every replica counts together: an attacker spreading guesses over the
replicas behind a load balancer gets no more tries than against one.

Failed-login key layout (under the `gateway` subspace): ("fail", kind, slice, key) -> counter,
where slice = floor(epoch seconds / (LOGIN_WINDOW_S / SLICES)); the last SLICES slices make the
window, and `sweep` clears every older slice with one range clear."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from mailmesh_common.address import client_key
from mailmesh_common.config import Settings
from mailmesh_common.kv import Database, Transaction, decode_counter
from svc_gateway.errors import ApiError, rate_limited
from svc_gateway.tokens import SPACE

# keys remembered per table; the least recently used go first beyond this
MAX_KEYS = 100_000
LOGIN_WINDOW_S = 900.0
SLICES = 5  # the failed-login window is counted in this many time slices
MAX_COUNTED_KEY_CHARS = 320  # an account address or an IP; longer keys are truncated
_FAILS = SPACE["fail"]


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class TokenBuckets:
    """`per_minute` events per key per minute, with bursts up to `per_minute`."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> int:
        """0 when allowed; otherwise the seconds to wait before retrying."""
        if self.per_minute <= 0:
            return 0
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        b = self.buckets.get(key)
        if b is None:
            b = _Bucket(float(self.per_minute), now)
            self.buckets[key] = b
            if len(self.buckets) > MAX_KEYS:
                self.buckets.popitem(last=False)
        else:
            self.buckets.move_to_end(key)
            b.tokens = min(float(self.per_minute), b.tokens + (now - b.stamp) * rate)
            b.stamp = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - b.tokens) / rate))


class FailureCounter:
    """Failures per key in the last `window_s` seconds, shared by every replica through the KV;
    `blocked` once `limit` is reached."""

    def __init__(self, db: Database, kind: str, limit: int, window_s: float = LOGIN_WINDOW_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.kind = kind
        self.limit = limit
        self.window_s = window_s
        self.slice_s = window_s / SLICES
        self.clock = clock

    def _keys(self, key: str, now: float) -> list[bytes]:
        current = int(now // self.slice_s)
        key = key[:MAX_COUNTED_KEY_CHARS]
        return [_FAILS.pack((self.kind, s, key)) for s in range(current - SLICES + 1, current + 1)]

    async def blocked(self, key: str) -> int:
        """0 when not blocked; otherwise the seconds until the oldest counted slice expires."""
        if self.limit <= 0:
            return 0
        now = self.clock()
        keys = self._keys(key, now)

        def read(tr: Transaction) -> list[int]:
            return [max(0, decode_counter(tr.get(k))) for k in keys]

        counts = await self.db.run(read, readonly=True)
        if sum(counts) < self.limit:
            return 0
        # the earliest moment the sum can drop below the limit: when the oldest slice with
        # failures leaves the window
        first = int(now // self.slice_s) - SLICES + 1
        oldest = next(i for i, c in enumerate(counts) if c)
        return max(1, math.ceil((first + oldest + 1) * self.slice_s + self.window_s - self.slice_s - now))

    async def record(self, key: str) -> None:
        k = self._keys(key, self.clock())[-1]
        await self.db.run(lambda tr: tr.add(k, 1))

    async def clear(self, key: str) -> None:
        keys = self._keys(key, self.clock())

        def fn(tr: Transaction) -> None:
            for k in keys:
                tr.clear(k)

        await self.db.run(fn)

    async def sweep(self) -> None:
        """Removes every slice that has left the window (one range clear)."""
        first = int(self.clock() // self.slice_s) - SLICES + 1
        begin, end = _FAILS.pack((self.kind,)), _FAILS.pack((self.kind, first))
        await self.db.run(lambda tr: tr.clear_range(begin, end))


class Limits:
    """Every limit the REST gateway applies."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.requests = TokenBuckets(settings.gateway_requests_per_minute)
        self.searches = TokenBuckets(settings.gateway_searches_per_minute)
        self.login_account = FailureCounter(db, "acct", settings.gateway_login_failures_per_account)
        self.login_ip = FailureCounter(db, "ip", settings.gateway_login_failures_per_ip)

    def request(self, user_id: str) -> None:
        """Counts one API request of the user; raises 429 over the limit."""
        wait = self.requests.take(user_id)
        if wait:
            raise rate_limited(wait, "too many requests; slow down")

    def search(self, user_id: str) -> None:
        """Counts one search of the user; raises 429 over the limit."""
        wait = self.searches.take(user_id)
        if wait:
            raise rate_limited(wait, "too many searches; slow down")

    async def check_login(self, account: str, ip: str) -> None:
        """Raises 429 while the account or the client IP has too many recent failed logins."""
        wait = max(await self.login_account.blocked(account), await self.login_ip.blocked(client_key(ip)))
        if wait:
            raise ApiError(429, "RATE_LIMITED", "too many failed logins; try again later", retry_after=wait)

    async def login_failed(self, account: str, ip: str) -> None:
        await self.login_account.record(account)
        await self.login_ip.record(client_key(ip))

    async def login_succeeded(self, account: str) -> None:
        await self.login_account.clear(account)

    async def sweep(self) -> None:
        """Drops failed-login counts that have left their window."""
        await self.login_account.sweep()
        await self.login_ip.sweep()
