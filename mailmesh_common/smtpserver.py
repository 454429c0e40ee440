"""What both SMTP servers (svc_ingest's MX, svc_send's submission) add to aiosmtpd's protocol:
admission against a total and a per-client connection limit, STARTTLS at most once (RFC 3207 4)
and marked on the session span, and a DATA timeout that bounds silence and a minimum rate."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from aiosmtpd.smtp import SMTP, syntax
from opentelemetry import trace

from mailmesh_common.limits import ConnectionLimiter

log = logging.getLogger(__name__)

# Bytes per second a DATA must average once it has lasted the idle timeout (Postfix's
# smtpd_min_data_rate): a sender trickling a byte just before each timeout is cut off
MIN_DATA_RATE = 500


class MailmeshSMTP(SMTP):
    session_span: trace.Span = trace.INVALID_SPAN  # set per connection by the server
    _data_started: float | None = None  # loop time the DATA being read began
    _data_bytes = 0

    async def admitted(self, open_sessions: int, most: int, limiter: ConnectionLimiter, ip: str, *,
                       busy: str, too_many_from_ip: str) -> bool:
        """Whether a new connection may go on: under `most` sessions in all (0: no limit) and a
        slot of `limiter` taken for ip (the caller releases it). Otherwise the refusal is sent,
        the connection closed and False returned."""
        if most and open_sessions >= most:
            refusal = busy
        elif not limiter.acquire(ip):
            refusal = too_many_from_ip
        else:
            return True
        log.info("refusing a connection from %s: %s", ip, refusal)
        with contextlib.suppress(Exception):
            await self.push(refusal)
        if self.transport is not None:
            self.transport.close()
        return False

    @contextlib.contextmanager
    def reading_data(self) -> Iterator[None]:
        """Around reading a message's DATA: the idle timeout restarts whenever bytes arrive
        (RFC 5321 4.5.3.2: timeouts are per read; aiosmtpd restarts it only on commands, which cut
        off a slow sender of a large message once its DATA had lasted that long), but only while
        the DATA averages MIN_DATA_RATE beyond the first timeout."""
        self._data_started, self._data_bytes = self.loop.time(), 0
        try:
            yield
        finally:
            self._data_started = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._data_started is not None:
            self._data_bytes += len(data)
            allowed = self._data_started + self._timeout_duration + self._data_bytes / MIN_DATA_RATE
            # (a duration of 0 would mean "the full timeout" to aiosmtpd)
            self._reset_timeout(max(0.001, min(self._timeout_duration, allowed - self.loop.time())))

    @syntax("STARTTLS", when="tls_context")  # the HELP text of the method this overrides
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:  # RFC 3207 4: not twice
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)
        self.session_span.set_attribute("mailmesh.smtp.tls", True)


__all__ = ["MIN_DATA_RATE", "MailmeshSMTP"]
