"""SMTP submission (RFC 6409) on aiosmtpd: STARTTLS (RFC 3207) on submission_port (587 in
production), and implicit TLS (RFC 8314 3.3) on submissions_port when set (465 in production);
AUTH PLAIN and LOGIN (RFC 4954) only over TLS (loopback clients exempt when submission_auth_loopback_plaintext is set, for
dev), credentials checked with MailboxService.Authenticate, MAIL FROM limited to the
authenticated account's addresses (553 5.7.1), then the same pipeline as the Send RPC. `250`
is sent only once the message is durably accepted (blob, SENT copy, held send).

Spans: `smtp.session` per connection, `smtp.data` per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
from typing import Any

from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session, syntax
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import types_pb2
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from mailmesh_common import address, telemetry
from mailmesh_common.config import Settings
from mailmesh_common.errors import InvalidInput, MailmeshError, Unauthenticated, Unavailable
from mailmesh_common.limits import JUNK_COMMAND_LIMITS, ConnectionLimiter
from mailmesh_common.mailboxclient import MailboxClient
from mailmesh_common.smtpserver import MailmeshSMTP
from svc_send.outbound import Outbox

log = logging.getLogger(__name__)

IDENT = "mailmesh ESMTP submission"
MAX_AUTH_FAILURES = 3

SENDER_OK = "250 2.1.0 Sender OK"
RCPT_OK = "250 2.1.5 Recipient OK"
NOT_YOUR_ADDRESS = "553 5.7.1 Sender address rejected: not owned by the authenticated user"
NO_SUCH_USER = "550 5.1.1 No such user"
BAD_ADDRESS = "501 5.1.3 Bad recipient address syntax"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_BIG = "552 5.3.4 Message too big for system"
TEMP_FAILURE = "451 4.3.0 Temporary server error, try again later"
AUTH_TEMP_FAILURE = "454 4.7.0 Temporary authentication failure"
AUTH_TOO_MANY = "421 4.7.0 Too many failed authentications; closing"
SERVER_BUSY = "421 4.3.2 Too many connections, try again later"
TOO_MANY_FROM_YOU = "421 4.7.0 Too many connections from your address, try again later"


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _reply(exc: MailmeshError) -> str:
    text = " ".join(exc.message.split())[:400] or exc.smtp.text
    return f"{exc.smtp.code} {exc.smtp.enhanced} {text}"


class SubmissionSMTP(MailmeshSMTP):
    """aiosmtpd's protocol with AUTH checked against the mailbox service and the session span."""

    def __init__(self, handler: SubmissionHandler, server: SubmissionServer, *, implicit_tls: bool = False) -> None:
        s = server.settings
        # implicit TLS: the connection is encrypted from its first byte, so no STARTTLS, and AUTH
        # is allowed at once
        super().__init__(handler, data_size_limit=s.max_message_bytes, enable_SMTPUTF8=True, decode_data=False,
                         hostname=server.hostname, ident=IDENT, tls_context=None if implicit_tls else server.tls_context,
                         timeout=s.smtp_timeout_s, auth_required=True,
                         auth_require_tls=s.submission_auth_require_tls,
                         authenticator=lambda *_args: AuthResult(success=False),
                         loop=asyncio.get_running_loop(), command_call_limit=JUNK_COMMAND_LIMITS)
        self.server = server
        self.implicit_tls = implicit_tls
        if implicit_tls:
            self._auth_require_tls = False  # TLS from the first byte (aiosmtpd only knows STARTTLS)
        self.failures = 0

    @property
    def peer_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else ""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        s = self.server.settings
        if s.submission_auth_loopback_plaintext and _is_loopback(self.peer_ip):
            self._auth_require_tls = False  # dev: AUTH on loopback without TLS

    async def _handle_client(self) -> None:
        ip = self.peer_ip
        if not await self.admitted(len(self.server.sessions), self.server.settings.submission_max_connections,
                                   self.server.connections, ip, busy=SERVER_BUSY, too_many_from_ip=TOO_MANY_FROM_YOU):
            return
        try:
            await self._serve()
        finally:
            self.server.connections.release(ip)

    async def _serve(self) -> None:
        self.server.sessions.add(self)
        span = telemetry.tracer("svc_send.submission").start_span("smtp.session", kind=SpanKind.SERVER, attributes={
            "network.peer.address": self.peer_ip, "network.protocol.name": "submission",
            "server.port": self.server.tls_port if self.implicit_tls else self.server.port,
            "mailmesh.smtp.tls": self.implicit_tls})
        self.session_span = span
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                await super()._handle_client()
        finally:
            self.server.sessions.discard(self)
            span.end()

    # AUTH: aiosmtpd parses PLAIN and LOGIN; the check is ours (asynchronous, against the mailbox)
    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        return AuthResult(success=True, auth_data=auth_data)  # parsed; verified in _verify

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_PLAIN(_, args))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await super().auth_LOGIN(_, args))

    async def _verify(self, parsed: AuthResult) -> AuthResult:
        if not parsed.success or not isinstance(parsed.auth_data, LoginPassword):
            return parsed
        creds = parsed.auth_data
        try:
            login = creds.login.decode("utf-8")
            password = creds.password.decode("utf-8")
            account = await self.server.mailbox.authenticate(login, password)
        except (UnicodeDecodeError, Unauthenticated, InvalidInput):
            self.failures += 1
            log.info("submission: failed AUTH", extra={"client_ip": self.peer_ip})
            if self.failures >= MAX_AUTH_FAILURES:
                await self.push(AUTH_TOO_MANY)
                if self.transport is not None:
                    self.transport.close()
                return AuthResult(success=False, handled=True)
            return AuthResult(success=False, handled=False)
        except MailmeshError:
            return AuthResult(success=False, handled=False, message=AUTH_TEMP_FAILURE)
        self.session_span.set_attribute("enduser.id", account.user_id)
        return AuthResult(success=True, auth_data=account)

    @syntax("DATA")  # the HELP text of the method this overrides
    async def smtp_DATA(self, arg: str) -> None:
        with self.reading_data():
            await super().smtp_DATA(arg)


class SubmissionHandler:
    """The aiosmtpd hooks: MAIL (owned address), RCPT (syntax, local users exist), DATA (pipeline)."""

    def __init__(self, server: SubmissionServer) -> None:
        self.server = server

    @staticmethod
    def _account(session: Session) -> types_pb2.Account | None:
        data = session.auth_data
        return data if isinstance(data, types_pb2.Account) else None

    async def handle_MAIL(self, server: SubmissionSMTP, session: Session, envelope: Envelope, address_: str,
                          mail_options: list[str]) -> str:
        account = self._account(session)
        if account is None:
            return "530 5.7.0 Authentication required"
        for opt in mail_options:
            name, _, value = opt.partition("=")
            if name.upper() == "SIZE" and value.isdigit() and int(value) > self.server.settings.max_message_bytes:
                return TOO_BIG  # RFC 1870 6.1
        try:
            wanted = address.canonical(address_)
        except InvalidInput:
            return NOT_YOUR_ADDRESS
        owned = {address.canonical(a) for a in (*account.addresses, account.email) if address.is_valid_mailbox(a)}
        if wanted not in owned:
            log.info("submission: MAIL FROM not owned", extra={"user_id": account.user_id})
            return NOT_YOUR_ADDRESS
        envelope.mail_from = address_
        envelope.mail_options.extend(mail_options)
        return SENDER_OK

    async def handle_RCPT(self, server: SubmissionSMTP, session: Session, envelope: Envelope, address_: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.server.settings.max_recipients_per_message:
            return TOO_MANY_RECIPIENTS
        if not address.is_valid_mailbox(address_):
            return BAD_ADDRESS
        try:
            res = await self.server.mailbox.resolve(address_)
        except InvalidInput:
            return BAD_ADDRESS
        except MailmeshError:
            return TEMP_FAILURE
        if res.resolution == mpb.RECIPIENT_RESOLUTION_UNKNOWN_USER:
            return NO_SUCH_USER
        envelope.rcpt_tos.append(address_)
        envelope.rcpt_options.extend(rcpt_options)
        return RCPT_OK

    async def handle_DATA(self, server: SubmissionSMTP, session: Session, envelope: Envelope) -> str:
        account = self._account(session)
        content = envelope.original_content or envelope.content
        if account is None or not isinstance(content, bytes) or not envelope.mail_from:
            return "503 5.5.1 Bad sequence of commands"
        with telemetry.tracer("svc_send.submission").start_as_current_span("smtp.data", attributes={
                "mailmesh.rcpt_count": len(envelope.rcpt_tos), "mailmesh.size": len(content)},
                record_exception=False, set_status_on_exception=False) as span:
            try:
                accepted = await self.server.outbox.submit(
                    account.user_id, envelope.mail_from, list(envelope.rcpt_tos), content,
                    helo=session.host_name or "", client_ip=server.peer_ip, account=account)
            except MailmeshError as exc:
                reply = TEMP_FAILURE if isinstance(exc, Unavailable) else _reply(exc)
                if type(exc) is MailmeshError:
                    log.error("submission failed: %s", exc.message)
                span.set_status(Status(StatusCode.ERROR, reply[:40]))
                return reply
            except Exception:
                log.exception("submission failed")
                span.set_status(Status(StatusCode.ERROR, "internal"))
                return TEMP_FAILURE
            span.set_attribute("smtp.reply", 250)
            return f"250 2.0.0 OK queued as {accepted.send.send.send_id}"


class SubmissionServer:
    """Listens on host:submission_port; one SubmissionSMTP per connection."""

    def __init__(self, settings: Settings, outbox: Outbox, mailbox: MailboxClient, tls_context: ssl.SSLContext,
                 hostname: str) -> None:
        self.settings = settings
        self.outbox = outbox
        self.mailbox = mailbox
        self.tls_context = tls_context
        self.hostname = hostname
        self.sessions: set[SubmissionSMTP] = set()
        self.connections = ConnectionLimiter(settings.submission_per_ip_max_connections)
        self.server: asyncio.Server | None = None
        self.tls_server: asyncio.Server | None = None
        self.port = 0
        self.tls_port = 0

    async def start(self) -> int:
        """Listens (and on submissions_port with implicit TLS, when set); raises OSError when a
        port is taken. Returns the bound submission port."""
        handler = SubmissionHandler(self)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: SubmissionSMTP(handler, self), host=self.settings.host,
                                               port=self.settings.submission_port, reuse_address=True)
        self.port = int(self.server.sockets[0].getsockname()[1])
        log.info("svc_send submission listening on %s:%d", self.settings.host, self.port)
        if self.settings.submissions_port:
            try:
                self.tls_server = await loop.create_server(
                    lambda: SubmissionSMTP(handler, self, implicit_tls=True), host=self.settings.host,
                    port=self.settings.submissions_port, reuse_address=True, ssl=self.tls_context,
                    ssl_handshake_timeout=self.settings.smtp_timeout_s)
            except BaseException:
                self.server.close()
                self.server = None
                raise
            self.tls_port = int(self.tls_server.sockets[0].getsockname()[1])
            log.info("svc_send submission (implicit TLS) listening on %s:%d", self.settings.host, self.tls_port)
        return self.port

    async def close(self) -> None:
        if self.tls_server is not None:
            self.tls_server.close()
        if self.server is None:
            return
        self.server.close()
        for s in list(self.sessions):
            with contextlib.suppress(Exception):
                if s.transport is not None and not s.transport.is_closing():
                    s._writer.write(b"421 4.3.2 Service shutting down\r\n")
                    s.transport.close()
        for srv in (self.server, self.tls_server):
            if srv is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(srv.wait_closed(), 2)
        self.server = self.tls_server = None


__all__ = ["SubmissionServer"]
