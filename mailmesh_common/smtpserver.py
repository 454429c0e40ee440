"""What both SMTP servers (svc_ingest's MX, svc_send's submission) add to aiosmtpd's protocol:
STARTTLS at most once (RFC 3207 4) and marked on the session span, and an idle timeout that
bytes of DATA restart too."""

from __future__ import annotations

from aiosmtpd.smtp import SMTP, syntax
from opentelemetry import trace


class MailmeshSMTP(SMTP):
    session_span: trace.Span = trace.INVALID_SPAN  # set per connection by the server
    _reading_data = False  # set while a message's DATA is being read

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._reading_data:
            # the timeout bounds silence, not the whole DATA (RFC 5321 4.5.3.2: timeouts are per
            # read): aiosmtpd restarts it only on commands, which cut off a slow sender of a large
            # message once its DATA had lasted that long
            self._reset_timeout()

    @syntax("STARTTLS", when="tls_context")  # the HELP text of the method this overrides
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:  # RFC 3207 4: not twice
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)
        self.session_span.set_attribute("mailmesh.smtp.tls", True)


__all__ = ["MailmeshSMTP"]
