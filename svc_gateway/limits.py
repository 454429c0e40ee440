"""Per-user request and search rate limits (token buckets) and failed-login counters (per
account and per client IP). Kept in the memory of one gateway replica; bounded in size."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

from mailmesh_common.config import Settings
from svc_gateway.errors import ApiError, rate_limited

# keys remembered per table; the least recently used go first beyond this
MAX_KEYS = 100_000
LOGIN_WINDOW_S = 900.0


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
    """Failures per key inside a sliding window; `blocked` once `limit` is reached."""

    def __init__(self, limit: int, window_s: float = LOGIN_WINDOW_S) -> None:
        self.limit = limit
        self.window_s = window_s
        self.failures: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self.failures.get(key, []) if now - t < self.window_s]
        if times:
            self.failures[key] = times
        else:
            self.failures.pop(key, None)
        return times

    def blocked(self, key: str, now: float | None = None) -> int:
        """0 when not blocked; otherwise the seconds until the oldest counted failure expires."""
        if self.limit <= 0:
            return 0
        now = time.monotonic() if now is None else now
        times = self._recent(key, now)
        if len(times) < self.limit:
            return 0
        return max(1, math.ceil(self.window_s - (now - times[-self.limit])))

    def record(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        times = self._recent(key, now)
        times.append(now)
        self.failures[key] = times[-max(self.limit, 1):]
        self.failures.move_to_end(key)
        if len(self.failures) > MAX_KEYS:
            self.failures.popitem(last=False)

    def clear(self, key: str) -> None:
        self.failures.pop(key, None)


class Limits:
    """Every limit the REST gateway applies."""

    def __init__(self, settings: Settings) -> None:
        self.requests = TokenBuckets(settings.gateway_requests_per_minute)
        self.searches = TokenBuckets(settings.gateway_searches_per_minute)
        self.login_account = FailureCounter(settings.gateway_login_failures_per_account)
        self.login_ip = FailureCounter(settings.gateway_login_failures_per_ip)

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

    def check_login(self, account: str, ip: str) -> None:
        """Raises 429 while the account or the client IP has too many recent failed logins."""
        wait = max(self.login_account.blocked(account), self.login_ip.blocked(ip))
        if wait:
            raise ApiError(429, "RATE_LIMITED", "too many failed logins; try again later", retry_after=wait)

    def login_failed(self, account: str, ip: str) -> None:
        self.login_account.record(account)
        self.login_ip.record(ip)

    def login_succeeded(self, account: str) -> None:
        self.login_account.clear(account)
