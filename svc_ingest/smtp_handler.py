"""The MX SMTP listener on aiosmtpd: EHLO (SIZE, 8BITMIME, SMTPUTF8, PIPELINING,
ENHANCEDSTATUSCODES, STARTTLS), per-IP limits, RCPT checks against svc_mailbox, DATA streamed
with the size limit enforced while reading, and the pipeline run at the end of DATA.

Every 2xx/4xx/5xx reply carries an RFC 3463 enhanced status code (RFC 2034). One span
`smtp.session` per connection and one `smtp.data` per message, whose context travels with the
message to INBOUND. `250` is sent only after the INBOUND publish ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import ssl
import tempfile
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import Envelope, Session, syntax
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from mailmesh_common import address as address_mod
from mailmesh_common import telemetry
from mailmesh_common.config import Settings
from mailmesh_common.errors import StorageFull
from mailmesh_common.limits import JUNK_COMMAND_LIMITS
from mailmesh_common.smtpserver import MailmeshSMTP
from svc_ingest import replies
from svc_ingest.limits import Limits
from svc_ingest.pipeline import Envelope as PipelineEnvelope
from svc_ingest.pipeline import Pipeline, Recipients
from svc_ingest.replies import Reply

log = logging.getLogger(__name__)

IDENT = "mailmesh ESMTP"
_END_OF_DATA = b"\r\n.\r\n"  # RFC 5321 4.1.1.4
# DATA stays in memory up to this size, then goes to an unlinked temp file
SPILL_BYTES = 1 << 20
_FLUSH_BYTES = 256 * 1024
# A reverse or forward path of a dot-atom local part and a plain domain (RFC 5321 4.1.2)
_PLAIN_PATH = re.compile(r"<([A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>")
# replies held back for one write (see MxSMTP.push) stay under this
MAX_HELD_REPLY_BYTES = 16 * 1024


class MxEnvelope(Envelope):
    """aiosmtpd's envelope plus what RCPT learned about each recipient."""

    def __init__(self) -> None:
        super().__init__()
        self.user_ids: list[str] = []
        self.canonical: set[str] = set()
        self.declared_size = 0
        self.rcpt_count = 0  # accepted RCPT commands, repeats included (the limit bounds commands)


class Spool:
    """The DATA of one message: in memory up to SPILL_BYTES, then in an unlinked temp file, so
    a large message never sits whole in memory while it is read."""

    def __init__(self, directory: Path | None, spill_bytes: int = SPILL_BYTES) -> None:
        self.directory = directory
        self.spill_bytes = spill_bytes
        self.size = 0
        self._mem = bytearray()
        self._file: Any = None

    async def write(self, data: bytes) -> None:
        self._mem += data
        self.size += len(data)
        if len(self._mem) >= _FLUSH_BYTES and (self._file is not None or self.size > self.spill_bytes):
            await asyncio.to_thread(self._flush)

    def _flush(self) -> None:
        if self._file is None:
            if self.directory is not None:
                self.directory.mkdir(parents=True, exist_ok=True)
            self._file = tempfile.TemporaryFile(dir=self.directory)
        self._file.write(self._mem)
        self._mem = bytearray()

    async def getvalue(self) -> bytes:
        if self._file is None:
            return bytes(self._mem)
        return await asyncio.to_thread(self._read_all)

    def _read_all(self) -> bytes:
        self._flush()
        self._file.seek(0)
        data: bytes = self._file.read()
        return data

    def close(self) -> None:
        self._mem = bytearray()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


class MxSMTP(MailmeshSMTP):
    """aiosmtpd's protocol with enhanced status codes, per-IP connection limits, the session
    span, and a streaming DATA."""

    # The StreamReader's limit (aiosmtpd: 1001). A command line longer than the command limits
    # still gets "500 Command line too long"; but the reader pauses the socket once it holds
    # twice this, and at 1001 every message of more than 2 kB paused and resumed it (epoll
    # changes, extra wakeups) while DATA was read
    line_length_limit = 32 * 1024

    def __init__(self, handler: MxHandler, listener: SmtpListener) -> None:
        s = listener.settings
        super().__init__(handler, data_size_limit=None, enable_SMTPUTF8=True, decode_data=False,
                         hostname=listener.hostname, ident=IDENT, tls_context=listener.tls_context,
                         timeout=s.smtp_timeout_s, auth_required=False, auth_require_tls=True,
                         loop=asyncio.get_running_loop(), command_call_limit=JUNK_COMMAND_LIMITS)
        # MX: no AUTH here (submission is svc_send's); an AUTH command is unknown
        self._smtp_methods.pop("AUTH", None)
        self.command_size_limits["MAIL"] = 512 + 26 + 10  # RFC 1870 4 (SIZE), RFC 6531 3.4 (SMTPUTF8)
        self.listener = listener
        self.mx_handler = handler
        self._greeted = False  # the greeting and EHLO/HELO answers carry no enhanced code
        self._plain_replies = False
        self.rdns: asyncio.Future[str] | None = None  # the client's verified name, looked up at connect
        self.dnsbl: asyncio.Future[str] | None = None  # the blocklist that lists the client, asked at connect
        self._held: list[bytes] = []  # replies push() holds back (see there)
        self._held_bytes = 0
        self.errors = 0  # 4xx/5xx replies since the session began or last accepted a message

    def _create_envelope(self) -> Envelope:
        return MxEnvelope()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's MAIL/RCPT path parser, with a fast path for the plain `<local@domain>`
        form nearly every client sends: the same (address, rest) the email package's parser
        gives for it (tests/svc_ingest/test_smtp_parsing.py compares them), at a fraction of
        the cost; anything else (quoting, comments, literals, routes) goes to that parser."""
        m = _PLAIN_PATH.match(arg)
        if m is not None:
            address, rest = m.group(1), arg[m.end():]
            if rest[:1] in (" ", "\t"):
                rest = rest.lstrip()  # the parser drops folding whitespace after the ">"
            if rest[:1] == "(":  # a comment: the parser's business
                return super()._getaddr(arg)  # type: ignore[no-any-return]
            if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
                return None, None
            return address, rest
        return super()._getaddr(arg)  # type: ignore[no-any-return]

    @property
    def peer_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else ""

    def tls_description(self) -> str:
        if self.transport is None or self._tls_protocol is None:
            return ""
        obj = self.transport.get_extra_info("ssl_object")
        if not isinstance(obj, ssl.SSLObject):
            return ""
        cipher = obj.cipher()
        return f"{obj.version() or 'TLS'} {cipher[0] if cipher else ''}".strip()

    async def push(self, status: Any) -> None:
        """Sends one reply line; a 250 line the client is not waiting for yet stays in a buffer
        (RFC 2920 3.1: the server may group the replies to pipelined commands), so a pipelined
        MAIL, RCPT, DATA gets its 250s and 354 in one write instead of one send() each. A reply
        is held only while a further line of this multi-line reply is coming or the client's
        next command is already read (so the server never waits for input with a reply
        unsent); anything but 250 is written at once, with whatever was held before it, and
        so is the reply at the end of DATA (smtp_DATA)."""
        if not self._greeted:
            self._greeted = True
        elif isinstance(status, str) and not self._plain_replies:
            status = replies.enhance(status)
        if isinstance(status, str):
            response = bytes(status, "utf-8" if self.enable_SMTPUTF8 else "ascii")
        else:
            response = status
        if response[:1] in (b"4", b"5") and response[:3] != b"421" and response[4:9] != b"4.5.3":
            # a client making error after error (probing for addresses, looping) is cut off,
            # like Postfix's smtpd_hard_error_limit; 452 4.5.3 is the normal way past 100
            # recipients, not a client error
            self.errors += 1
            if self.errors > self.listener.settings.smtp_max_errors > 0:
                log.info("closing the session of %s: %d errors", self.peer_ip, self.errors - 1)
                self.session_span.set_attribute("mailmesh.smtp.too_many_errors", True)
                response = replies.TOO_MANY_ERRORS.line().encode()
                self._held.append(response + b"\r\n")
                self.flush_replies()
                if self.transport is not None:
                    self.transport.close()
                return
        self._held.append(response + b"\r\n")
        self._held_bytes += len(response) + 2
        if response[:3] == b"250" and self._held_bytes < MAX_HELD_REPLY_BYTES and (
                response[3:4] == b"-" or b"\n" in getattr(self._reader, "_buffer", b"")):
            return
        self.flush_replies()
        await self._writer.drain()

    def flush_replies(self) -> None:
        """Writes the replies held back by push, in order."""
        if self._held:
            data = b"".join(self._held) if len(self._held) > 1 else self._held[0]
            self._held.clear()
            self._held_bytes = 0
            if self.transport is not None and not self.transport.is_closing():
                self._writer.write(data)

    async def _handle_client(self) -> None:
        ip = self.peer_ip
        limits = self.listener.limits
        if not await self.admitted(len(self.listener.sessions), self.listener.settings.smtp_max_connections,
                                   limits.connections, ip, busy=replies.SERVER_BUSY.line(),
                                   too_many_from_ip=replies.TOO_MANY_CONNECTIONS.line()):
            return
        self.listener.sessions.add(self)
        self.listener.connections_total += 1
        tracer = telemetry.tracer("svc_ingest.smtp")
        span = tracer.start_span("smtp.session", kind=SpanKind.SERVER, attributes={
            "network.peer.address": ip, "network.protocol.name": "smtp", "server.port": self.listener.port})
        self.session_span = span
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                if ip:
                    # reverse DNS runs while the client talks; DATA waits for it (bounded)
                    self.rdns = asyncio.ensure_future(self.listener.pipeline.reverse_name(ip))
                    if self.listener.settings.dnsbl_zones:  # so do blocklists; RCPT waits for them
                        self.dnsbl = asyncio.ensure_future(self.listener.pipeline.blocklisted(ip))
                await super()._handle_client()
        finally:
            for lookup in (self.rdns, self.dnsbl):
                if lookup is not None and not lookup.done():
                    lookup.cancel()
            limits.connections.release(ip)
            self.listener.sessions.discard(self)
            span.end()

    async def client_name(self) -> str:
        """The client's forward-confirmed reverse DNS name, "" when it has none."""
        return await _shielded(self.rdns)

    async def blocklist(self) -> str:
        """The configured DNS blocklist that lists the client, "" when none does."""
        return await _shielded(self.dnsbl)

    @syntax("HELO hostname")  # the HELP text of the method this overrides
    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    @syntax("EHLO hostname")  # the HELP text of the method this overrides
    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False

    async def _read_data(self, spool: Spool, limit: int) -> Reply | None:
        """Reads the message up to its final CRLF.CRLF into spool, unstuffed (RFC 5321 4.5.2),
        in large pieces rather than line by line; never reads past the terminator (what
        follows is the client's next pipelined command). A refusal when the message went over
        `limit` or the spool could not be written (it is then read to its end but not kept),
        so the reply comes after the final dot and the session stays in step."""
        pending = b"\r\n"  # the line break before the first line: a first line "." ends the data
        virtual = True  # pending still starts with that made-up line break
        refusal: Reply | None = None

        async def release(segment: bytes) -> None:
            nonlocal virtual, refusal
            segment = segment.replace(b"\r\n.", b"\r\n")  # RFC 5321 4.5.2 transparency
            if virtual:
                segment, virtual = segment[2:], False
            if refusal is not None or not segment:
                return
            if spool.size + len(segment) > limit:
                refusal = replies.MESSAGE_TOO_BIG
                spool.close()
                return
            try:
                await spool.write(segment)
            except OSError as exc:  # e.g. the disk is full
                log.error("cannot spool a message: %s", exc.strerror or exc, extra={"client_ip": self.peer_ip})
                refusal = StorageFull.smtp if exc.errno in (errno.ENOSPC, errno.EDQUOT) else replies.TEMP_FAILURE
                spool.close()

        while self.transport is not None:
            end = pending.find(_END_OF_DATA)
            if end >= 0:
                await release(pending[:end + 2])  # with the line break ending the last line
                return refusal
            # keep back what could be the start of the terminator; the rest is message
            keep = next((k for k in (4, 3, 2, 1) if pending.endswith(_END_OF_DATA[:k])), 0)
            if len(pending) - keep > (2 if virtual else 0):
                await release(pending[:len(pending) - keep])
                pending = pending[len(pending) - keep:]
            if keep:
                # exactly the bytes that would complete the terminator: never past it
                pending += await self._reader.readexactly(len(_END_OF_DATA) - keep)
                continue
            try:
                pending += await self._reader.readuntil(_END_OF_DATA)
            except asyncio.LimitOverrunError as exc:
                # no terminator within the reader's limit: take what is there and go on
                pending += await self._reader.read(max(exc.consumed, 1))
        # the connection went away before the final dot: a partial message is never accepted
        raise ConnectionResetError("connection lost during DATA")

    @syntax("DATA")  # the HELP text of the method this overrides
    async def smtp_DATA(self, arg: str) -> None:
        """RFC 5321 4.1.1.4 DATA, streamed: the size limit is enforced while reading, the reply
        for an oversized message is given after its final dot (RFC 5321 4.2.5)."""
        if await self.check_helo_needed():
            return
        env = self.envelope
        assert env is not None and self.session is not None
        if not env.rcpt_tos:
            await self.push("503 5.5.1 Need RCPT command" if env.mail_from else "503 5.5.1 Need MAIL command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push(replies.START_DATA)
        limit = self.listener.settings.max_message_bytes
        spool = Spool(self.listener.spool_dir)
        try:
            with self.reading_data():
                refusal = await self._read_data(spool, limit)
            if refusal is not None:
                if refusal is replies.MESSAGE_TOO_BIG:
                    log.info("message over the size limit refused", extra={"client_ip": self.peer_ip})
                self._set_post_data_state()
                await self.push(refusal.line())
                return
            content = await spool.getvalue()
        finally:
            spool.close()
        env.content = env.original_content = content
        assert isinstance(env, MxEnvelope)
        self.listener.busy_enter()
        try:
            status = await self.mx_handler.handle_DATA(self, self.session, env)
        finally:
            self.listener.busy_exit()
        self._set_post_data_state()
        await self.push(status)
        # the verdict on a message goes out now even when the client has pipelined more
        # commands: a 250 held back and lost with the connection would make it send again
        self.flush_replies()


class MxHandler:
    """The aiosmtpd hooks: EHLO/HELO, MAIL (rate limit, SIZE), RCPT (recipient check), DATA."""

    def __init__(self, listener: SmtpListener) -> None:
        self.listener = listener
        self.settings = listener.settings

    async def handle_EHLO(self, server: MxSMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        lines = [server.hostname, f"SIZE {self.settings.max_message_bytes}", "8BITMIME", "SMTPUTF8",
                 "PIPELINING", "ENHANCEDSTATUSCODES"]
        if any(r[4:] == "STARTTLS" for r in responses):
            lines.append("STARTTLS")
        return [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_HELO(self, server: MxSMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: MxSMTP, session: Session, envelope: MxEnvelope, address: str,
                          mail_options: list[str]) -> str:
        for opt in mail_options:
            name, _, value = opt.partition("=")
            if name == "SIZE":
                if not value.isdigit():
                    return replies.BAD_SIZE_PARAMETER.line()
                if int(value) > self.settings.max_message_bytes:  # RFC 1870 6.1
                    return replies.MESSAGE_TOO_BIG.line()
                envelope.declared_size = int(value)
        if not _address_ok(address, envelope.smtp_utf8, null_ok=True):
            return _address_reply(address, replies.BAD_SENDER_SYNTAX)
        if not self.listener.limits.rate.allow(server.peer_ip):
            log.info("rate limit: refusing a message from %s", server.peer_ip)
            return replies.RATE_LIMITED.line()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SENDER_OK.line()

    async def handle_RCPT(self, server: MxSMTP, session: Session, envelope: MxEnvelope, address: str,
                          rcpt_options: list[str]) -> str:
        if envelope.rcpt_count >= self.settings.max_recipients:
            return replies.TOO_MANY_RECIPIENTS.line()
        if address.lower() == "postmaster":
            # RFC 5321 4.1.1.3: <Postmaster> without a domain is valid and MUST be accepted; it
            # is the postmaster of the domain the `postmaster` setting's account is in
            if not self.settings.postmaster:
                return replies.NO_SUCH_USER.line()
            address = "postmaster@" + self.settings.postmaster.rpartition("@")[2]
        if not _address_ok(address, envelope.smtp_utf8, null_ok=False):
            return _address_reply(address, replies.BAD_RECIPIENT_SYNTAX)
        zone = await server.blocklist()
        # a listed sender can still reach postmaster@ and abuse@ to ask why (RFC 5321 4.5.1)
        if zone and address.rpartition("@")[0].lower() not in address_mod.ROLE_LOCAL_PARTS:
            log.info("refusing a recipient: client %s is listed in %s", server.peer_ip, zone,
                     extra={"event": "dnsbl_refused", "client_ip": server.peer_ip, "zone": zone})
            server.session_span.set_attribute("mailmesh.dnsbl.zone", zone)
            return replies.blocklisted(server.peer_ip, zone).line()
        check = await self.listener.recipients.check(address, envelope.declared_size)
        if check.accepted:
            envelope.rcpt_count += 1
            key = check.canonical or address.lower()
            if key not in envelope.canonical:  # the same mailbox twice: one envelope recipient
                envelope.canonical.add(key)
                envelope.rcpt_tos.append(address)
                envelope.rcpt_options.extend(rcpt_options)
                envelope.user_ids.append(check.user_id)
        return check.reply.line()

    async def handle_DATA(self, server: MxSMTP, session: Session, envelope: MxEnvelope) -> str:
        content = envelope.content
        assert isinstance(content, bytes)
        mail_from = envelope.mail_from or ""
        env = PipelineEnvelope(
            mail_from="" if mail_from == "<>" else mail_from, rcpt_to=list(envelope.rcpt_tos),
            user_ids=list(envelope.user_ids), client_ip=server.peer_ip, helo=session.host_name or "",
            esmtp=bool(session.extended_smtp), smtputf8=bool(envelope.smtp_utf8), tls=server.tls_description(),
            client_name=await server.client_name())
        tracer = telemetry.tracer("svc_ingest.smtp")
        with tracer.start_as_current_span("smtp.data", attributes={
                "mailmesh.rcpt_count": len(env.rcpt_to), "mailmesh.size": len(content)},
                record_exception=False, set_status_on_exception=False) as span:
            try:
                accepted = await self.listener.pipeline.process(content, env)
            except Exception as exc:
                reply = replies.for_error(exc)
                if reply is replies.TEMP_FAILURE and not hasattr(exc, "smtp"):
                    log.exception("pipeline failed")
                else:
                    log.info("message not accepted: %s", reply.line())
                span.set_attribute("smtp.reply", reply.code)
                if reply.code >= 400:
                    span.set_status(Status(StatusCode.ERROR, reply.enhanced))
                return reply.line()
            span.set_attribute("smtp.reply", 250)
            server.errors = 0
            return replies.queued(accepted.ingest_id).line()

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %r", error)
        return replies.TEMP_FAILURE.line()


async def _shielded(lookup: asyncio.Future[str] | None) -> str:
    """A session's lookup started at connect: its result, "" when there is none or it was
    cancelled (the session ending); awaiting it never cancels it."""
    if lookup is None:
        return ""
    try:
        return await asyncio.shield(lookup)
    except asyncio.CancelledError:
        if lookup.cancelled():
            return ""
        raise


def _address_ok(address: str, smtputf8: bool, *, null_ok: bool) -> bool:
    if address == "<>":
        return null_ok
    try:
        address.encode("utf-8")  # surrogate escapes: bytes that are not UTF-8
    except UnicodeEncodeError:
        return False
    if not address.isascii() and not smtputf8:
        return False
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and len(address) <= 320


def _address_reply(address: str, default: Reply) -> str:
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return default.line()
    if not address.isascii():
        # RFC 6531 3.7.4.1: a non-ASCII address needs the SMTPUTF8 parameter on MAIL
        return "553 5.6.7 Non-ASCII address requires SMTPUTF8"
    return default.line()


class SmtpListener:
    """The SMTP MX server: binds host:smtp_port, runs an MxSMTP per connection."""

    def __init__(self, settings: Settings, pipeline: Pipeline, recipients: Recipients, limits: Limits,
                 tls_context: ssl.SSLContext | None, hostname: str, spool_dir: Path | None = None) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.recipients = recipients
        self.limits = limits
        self.tls_context = tls_context
        self.hostname = hostname
        self.spool_dir = spool_dir
        self.sessions: set[MxSMTP] = set()
        self.connections_total = 0  # sessions this listener (this worker) has served
        self._busy = 0  # messages inside the pipeline; shutdown waits for them
        self._idle = asyncio.Event()
        self._idle.set()
        self.server: asyncio.Server | None = None
        self.port = 0

    def busy_enter(self) -> None:
        self._busy += 1
        self._idle.clear()

    def busy_exit(self) -> None:
        self._busy -= 1
        if self._busy == 0:
            self._idle.set()

    async def start(self) -> int:
        """Listens; raises OSError when the port is taken. Returns the bound port."""
        loop = asyncio.get_running_loop()
        handler = MxHandler(self)
        # several worker processes share the port (the kernel spreads connections over them);
        # a single worker keeps it exclusive, so a second installation cannot bind it unnoticed
        self.server = await loop.create_server(lambda: MxSMTP(handler, self), host=self.settings.host,
                                               port=self.settings.smtp_port, reuse_address=True,
                                               reuse_port=self.settings.ingest_workers > 1)
        self.port = int(self.server.sockets[0].getsockname()[1])
        log.info("svc_ingest SMTP listening on %s:%d", self.settings.host, self.port)
        return self.port

    async def close(self, grace_s: float = 10.0) -> None:
        """Stops accepting; lets messages inside the pipeline finish (up to grace_s), then says 421
        to every remaining session and closes it."""
        if self.server is None:
            return
        self.server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        for s in list(self.sessions):
            with contextlib.suppress(Exception):
                if s.transport is not None and not s.transport.is_closing():
                    s.flush_replies()
                    s._writer.write(replies.SHUTTING_DOWN.line().encode() + b"\r\n")
                    s.transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)
        self.server = None
