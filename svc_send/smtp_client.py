"""An asyncio SMTP client for delivery to remote servers (RFC 5321): EHLO (HELO fallback),
opportunistic STARTTLS (RFC 3207; certificates are not verified, RFC 7435), SIZE (RFC 1870),
8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), PIPELINING (RFC 2920), several recipients per
transaction and several transactions per connection (RSET between them).

Every command has a deadline (RFC 5321 4.5.3.2); a connection that breaks or times out raises
SmtpConnectionLost and cannot be used again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

# RFC 5321 4.5.3.2.6: wait up to 10 minutes for the reply to the final dot
DATA_END_TIMEOUT_S = 600.0
MAX_REPLY_LINES = 100
_WRITE_CHUNK = 64 * 1024


class SmtpConnectionLost(Exception):
    """The connection could not be made, broke, timed out, or the peer spoke no SMTP."""


class NeedsSmtpUtf8(Exception):
    """The envelope needs SMTPUTF8 (RFC 6531) and the server does not offer it."""


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: code and text (continuation lines joined with a space)."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.text.split())}".strip()

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500


@dataclass
class Transaction:
    """The replies of one mail transaction."""

    mail: Reply
    rcpt: dict[str, Reply] = field(default_factory=dict)
    data: Reply | None = None

    def outcome(self, rcpt: str) -> Reply:
        """The reply that decides the fate of one recipient."""
        if not self.mail.ok:
            return self.mail
        r = self.rcpt.get(rcpt)
        if r is None or not r.ok:
            return r or Reply(451, "4.3.0 no reply to RCPT")
        return self.data or Reply(451, "4.3.0 no reply to DATA")


def opportunistic_tls_context() -> ssl.SSLContext:
    """TLS for MTA-to-MTA delivery: encrypt, but accept any certificate (RFC 7435)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def dot_stuff(data: bytes) -> bytes:
    """RFC 5321 4.5.2 transparency, with the final CRLF the end-of-data dot needs."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


class SmtpClient:
    """One connection to one server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, ip: str,
                 command_timeout_s: float) -> None:
        self.reader = reader
        self.writer = writer
        self.host = host
        self.ip = ip
        self.timeout_s = command_timeout_s
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.broken = False
        self.transactions = 0
        self.data_sent = False  # the current transaction's message went out (its fate may be unknown)

    @property
    def peer(self) -> str:
        return f"{self.host} [{self.ip}]"

    @classmethod
    async def connect(cls, host: str, ip: str, port: int, helo: str, *, connect_timeout_s: float,
                      command_timeout_s: float, tls: ssl.SSLContext | None) -> SmtpClient:
        """Connects, reads the greeting, says EHLO and upgrades to TLS when offered."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port, limit=1 << 16),
                                                    connect_timeout_s)
        except (OSError, TimeoutError) as exc:
            raise SmtpConnectionLost(f"cannot connect to {host} [{ip}]:{port}: {_reason(exc)}") from None
        client = cls(reader, writer, host, ip, command_timeout_s)
        try:
            greeting = await client.read_reply()
            if greeting.code != 220:
                await client.quit()
                raise SmtpConnectionLost(f"{client.peer} greeted with {greeting}")
            await client.hello(helo)
            if tls is not None and "STARTTLS" in client.extensions:
                reply = await client.command("STARTTLS")
                if reply.code == 220:
                    try:
                        await asyncio.wait_for(writer.start_tls(tls, server_hostname=host), connect_timeout_s)
                    except (OSError, ssl.SSLError, TimeoutError) as exc:
                        client.close()
                        raise SmtpConnectionLost(f"TLS handshake with {client.peer} failed: {_reason(exc)}") from None
                    client.tls = True
                    await client.hello(helo)  # RFC 3207 4.2: forget what was learnt before TLS
        except BaseException:  # SmtpConnectionLost, or cancelled
            client.close()
            raise
        return client

    async def hello(self, helo: str) -> None:
        reply = await self.command(f"EHLO {helo}")
        self.extensions = {}
        if reply.code == 250:
            for line in reply.text.split("\n")[1:]:
                name, _, value = line.strip().partition(" ")
                self.extensions[name.upper()] = value
            return
        reply = await self.command(f"HELO {helo}")
        if reply.code != 250:
            raise SmtpConnectionLost(f"{self.peer} refused HELO: {reply}")

    async def read_reply(self, timeout_s: float | None = None) -> Reply:
        lines: list[str] = []
        code = 0
        while True:
            try:
                raw = await asyncio.wait_for(self.reader.readline(), timeout_s or self.timeout_s)
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                self.broken = True
                raise SmtpConnectionLost(f"no reply from {self.peer}: {_reason(exc)}") from None
            if not raw:
                self.broken = True
                raise SmtpConnectionLost(f"{self.peer} closed the connection")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
                self.broken = True
                raise SmtpConnectionLost(f"{self.peer} sent a malformed reply: {line[:100]!r}")
            code = int(line[:3])
            lines.append(line[4:])
            if len(line) == 3 or line[3] == " " or len(lines) >= MAX_REPLY_LINES:
                break
        return Reply(code, "\n".join(lines))

    async def _write(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            self.broken = True
            raise SmtpConnectionLost(f"sending to {self.peer} failed: {_reason(exc)}") from None

    async def command(self, line: str) -> Reply:
        await self._write(line.encode("utf-8") + b"\r\n")
        return await self.read_reply()

    async def send(self, mail_from: str, rcpts: list[str], data: bytes, *, smtputf8: bool = False) -> Transaction:
        """One mail transaction for rcpts; DATA only when a recipient was accepted."""
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={len(data)}")
        if "8BITMIME" in self.extensions and not data.isascii():
            params.append("BODY=8BITMIME")
        if smtputf8:
            if "SMTPUTF8" not in self.extensions:
                raise NeedsSmtpUtf8(f"{self.peer} does not support SMTPUTF8")
            params.append("SMTPUTF8")
        mail_cmd = f"MAIL FROM:<{mail_from}>" + "".join(f" {p}" for p in params)
        rcpt_cmds = [f"RCPT TO:<{r}>" for r in rcpts]
        self.transactions += 1
        self.data_sent = False
        if "PIPELINING" in self.extensions:  # RFC 2920 3.1: MAIL and RCPT go in one batch
            await self._write("".join(c + "\r\n" for c in [mail_cmd, *rcpt_cmds]).encode("utf-8"))
            mail = await self.read_reply()
            replies = [await self.read_reply() for _ in rcpts]
        else:
            mail = await self.command(mail_cmd)
            replies = []
            if mail.ok:
                for cmd in rcpt_cmds:
                    replies.append(await self.command(cmd))
        tx = Transaction(mail, dict(zip(rcpts, replies, strict=False)))
        if not mail.ok or not any(r.ok for r in replies):
            await self.reset()
            return tx
        go = await self.command("DATA")
        if go.code != 354:
            tx.data = go
            await self.reset()  # leave the connection ready for the next transaction
            return tx
        self.data_sent = True  # from here a lost connection may have delivered it (RFC 1047)
        await self._write(dot_stuff(data) + b".\r\n")
        tx.data = await self.read_reply(DATA_END_TIMEOUT_S)
        return tx

    async def reset(self) -> bool:
        """RSET (RFC 5321 4.1.1.5); False when the connection is no longer usable."""
        if self.broken:
            return False
        try:
            return (await self.command("RSET")).code == 250
        except SmtpConnectionLost:
            return False

    async def quit(self) -> None:
        if not self.broken:
            with contextlib.suppress(SmtpConnectionLost):
                await asyncio.wait_for(self.command("QUIT"), 5)
        self.close()

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(Exception):
            self.writer.close()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return exc.__class__.__name__


__all__ = ["NeedsSmtpUtf8", "Reply", "SmtpClient", "SmtpConnectionLost", "Transaction", "dot_stuff",
           "opportunistic_tls_context"]
