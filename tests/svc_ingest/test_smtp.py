"""The MX over real SMTP on loopback (smtplib and a raw socket): EHLO extensions, every reply
code with its enhanced status code, recipients checked against svc_mailbox, multi-recipient
and BCC delivery from one blob, 8-bit and SMTPUTF8, PIPELINING, STARTTLS, and the headers
prepended to what is delivered."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl

import pytest
from mailmesh.v1 import mailbox_service_pb2 as mb_pb
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.svc_ingest.conftest import IngestMesh, in_thread, message, reply_of

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def inbound_last_seq(m: IngestMesh) -> int:
    info = await m.mailbox.js.stream_info("INBOUND")
    return int(info.state.last_seq)


def send(m: IngestMesh, raw: bytes, rcpts: list[str], sender: str = "sender@remote.test",
         **kw: object) -> dict[str, tuple[int, bytes]]:
    with m.smtp() as s:
        return s.sendmail(sender, rcpts, raw, **kw)  # type: ignore[arg-type]


def dialog(m: IngestMesh, *commands: str) -> list[tuple[int, bytes]]:
    """EHLO, then each command; the replies."""
    with m.smtp() as s:
        s.ehlo()
        return [s.docmd(c) for c in commands]


# --- the session --------------------------------------------------------------------------------

async def test_greeting_and_ehlo_advertise_the_extensions(shared_ingest: IngestMesh) -> None:
    def run() -> tuple[bytes, dict[str, str], tuple[int, bytes]]:
        with shared_ingest.smtp() as s:
            code, banner = s.ehlo()
            assert code == 250
            return s.ehlo_resp or b"", dict(s.esmtp_features), s.docmd("AUTH", "PLAIN")

    resp, features, auth_reply = await in_thread(run)
    assert resp.splitlines()[0] == b"mx.mailmesh.test"  # EHLO answers carry no enhanced code
    assert features["size"] == str(25 * 1024 * 1024)
    for ext in ("8bitmime", "smtputf8", "pipelining", "enhancedstatuscodes", "starttls"):
        assert ext in features, ext
    assert "auth" not in features  # an MX takes no AUTH
    assert auth_reply[0] == 500 and auth_reply[1].startswith(b"5.5.2 ")


async def test_banner_names_the_host(shared_ingest: IngestMesh) -> None:
    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", shared_ingest.smtp_port), timeout=10) as sock:
            return sock.recv(512)

    assert await in_thread(run) == b"220 mx.mailmesh.test mailmesh ESMTP\r\n"


async def test_every_reply_carries_an_enhanced_status_code(shared_ingest: IngestMesh) -> None:
    replies = await in_thread(dialog, shared_ingest, "NOOP", "RSET", "VRFY alice", "BOGUS", "DATA",
                              "RCPT TO:<alice@example.com>", "MAIL FROM:<a@remote.test>",
                              "MAIL FROM:<b@remote.test>", "MAIL FROM:<a@remote.test> SIZE=abc")
    assert replies[0] == (250, b"2.0.0 OK")
    assert replies[1] == (250, b"2.0.0 OK")
    assert replies[2][0] == 252 and replies[2][1].startswith(b"2.0.0 ")
    assert replies[3][0] == 500 and replies[3][1].startswith(b"5.5.2 ")
    assert replies[4] == (503, b"5.5.1 Need MAIL command")
    assert replies[5][0] == 503 and replies[5][1].startswith(b"5.5.1 ")
    assert replies[6] == (250, b"2.1.0 Sender OK")
    assert replies[7][0] == 503 and replies[7][1].startswith(b"5.5.1 ")  # nested MAIL
    for code, text in replies:
        assert text[:1] == str(code)[:1].encode() and text[1:2] == b".", (code, text)


async def test_help_lists_every_command(shared_ingest: IngestMesh) -> None:
    replies = await in_thread(dialog, shared_ingest, "HELP", "HELP DATA", "HELP EHLO")
    commands = set(replies[0][1].decode().split(":", 1)[1].split())
    assert {"DATA", "EHLO", "HELO", "MAIL", "RCPT", "RSET", "NOOP", "QUIT", "STARTTLS", "VRFY"} <= commands
    assert replies[1] == (250, b"2.0.0 Syntax: DATA") and replies[2] == (250, b"2.0.0 Syntax: EHLO hostname")


async def test_quit_says_bye_with_an_enhanced_code(shared_ingest: IngestMesh) -> None:
    def run() -> tuple[int, bytes]:
        s = shared_ingest.smtp()
        s.ehlo()
        return s.docmd("QUIT")

    assert await in_thread(run) == (221, b"2.0.0 Bye")


# --- RCPT ----------------------------------------------------------------------------------------

async def test_unknown_rcpt_gets_550_and_nothing_is_stored(shared_ingest: IngestMesh) -> None:
    before = await inbound_last_seq(shared_ingest)
    replies = await in_thread(dialog, shared_ingest, "MAIL FROM:<s@remote.test>", "RCPT TO:<nobody@example.com>",
                              "DATA")
    assert replies[1] == (550, b"5.1.1 No such user")
    assert replies[2] == (503, b"5.5.1 Need RCPT command")
    assert await inbound_last_seq(shared_ingest) == before


async def test_foreign_domain_gets_554_relay_denied(shared_ingest: IngestMesh) -> None:
    replies = await in_thread(dialog, shared_ingest, "MAIL FROM:<s@remote.test>",
                              "RCPT TO:<someone@elsewhere.test>", "RCPT TO:<alice@example.com>")
    assert replies[1] == (554, b"5.7.1 Relay access denied")
    assert replies[2] == (250, b"2.1.5 Recipient OK")


async def test_unknown_rcpt_refused_by_sendmail_while_the_others_get_the_message(shared_ingest: IngestMesh) -> None:
    raw = message("partly refused", to="bob@example.com")
    refused = await in_thread(send, shared_ingest, raw, ["bob@example.com", "ghost@example.com"])
    assert refused == {"ghost@example.com": (550, b"5.1.1 No such user")}
    await shared_ingest.wait_subject("bob", "partly refused")


async def test_more_than_100_recipients_gets_452(shared_ingest: IngestMesh) -> None:
    cmds = ["MAIL FROM:<s@remote.test>"] + [f"RCPT TO:<{u}@example.com>" for u in ("alice", "bob", "carol") * 34]
    replies = await in_thread(dialog, shared_ingest, *cmds)
    rcpt = replies[1:]
    assert all(r == (250, b"2.1.5 Recipient OK") for r in rcpt[:100])
    assert rcpt[100] == (452, b"4.5.3 Too many recipients")
    assert rcpt[101] == (452, b"4.5.3 Too many recipients")


async def test_malformed_recipient_gets_5xx(shared_ingest: IngestMesh) -> None:
    replies = await in_thread(dialog, shared_ingest, "MAIL FROM:<s@remote.test>", "RCPT TO:<no-at-sign>",
                              "RCPT TO:<>")
    assert replies[1] == (501, b"5.1.3 Bad recipient address syntax")
    assert replies[2][0] in (501, 553) and replies[2][1].startswith(b"5.1.3")


async def test_overlong_command_lines_get_500_and_the_session_goes_on(shared_ingest: IngestMesh) -> None:
    long_rcpt = "RCPT TO:<" + "a" * 5000 + "@example.com>"
    huge = "NOOP " + "x" * 100_000  # past the reader's limit too
    replies = await in_thread(dialog, shared_ingest, "MAIL FROM:<s@remote.test>", long_rcpt, huge,
                              "RCPT TO:<alice@example.com>")
    assert replies[1] == (500, b"5.5.2 Command line too long")
    assert replies[2] == (500, b"5.5.2 Command line too long")
    assert replies[3] == (250, b"2.1.5 Recipient OK")


# --- size and loops ------------------------------------------------------------------------------

async def test_declared_size_over_the_limit_is_refused_at_mail(shared_ingest: IngestMesh) -> None:
    replies = await in_thread(dialog, shared_ingest, f"MAIL FROM:<s@remote.test> SIZE={30 * 1024 * 1024}")
    assert replies[0] == (552, b"5.3.4 Message too big for system")


async def test_more_than_50_received_headers_is_a_loop(shared_ingest: IngestMesh) -> None:
    hops = tuple(f"Received: from hop{i}.test by hop{i + 1}.test; Mon, 23 Nov 2026 10:00:00 +0000"
                 for i in range(51))
    before = await inbound_last_seq(shared_ingest)
    with pytest.raises(smtplib.SMTPDataError) as err:
        await in_thread(send, shared_ingest, message("looping", headers=hops), ["alice@example.com"])
    assert reply_of(err.value) == (554, b"5.4.6 Routing loop detected: too many Received headers")
    assert await inbound_last_seq(shared_ingest) == before
    # 50 is still fine
    await in_thread(send, shared_ingest, message("fifty hops", headers=hops[:50]), ["alice@example.com"])
    await shared_ingest.wait_subject("alice", "fifty hops")


# --- delivery ------------------------------------------------------------------------------------

async def test_multi_recipient_message_is_one_blob_and_one_inbound_message(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    before = await inbound_last_seq(m)
    raw = message("for three", to="alice@example.com, bob@example.com, carol@example.com")
    assert await in_thread(send, m, raw, ["alice@example.com", "bob@example.com", "carol@example.com"]) == {}
    got = [await m.wait_subject(u, "for three") for u in ("alice", "bob", "carol")]
    assert len({g.blob_ref for g in got}) == 1
    assert await inbound_last_seq(m) == before + 1
    first = await m.raw("alice", got[0].id)
    assert b"\r\n\tfor <" not in first.split(b"\r\n\r\n")[0]  # several recipients: none named


async def test_bcc_recipient_gets_the_message_without_being_disclosed(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    raw = message("with bcc", to="alice@example.com")
    assert await in_thread(send, m, raw, ["alice@example.com", "carol@example.com"]) == {}
    to_alice = await m.wait_subject("alice", "with bcc")
    to_carol = await m.wait_subject("carol", "with bcc")
    assert to_alice.blob_ref == to_carol.blob_ref
    assert b"carol" not in await m.raw("alice", to_alice.id)


async def test_delivered_message_has_return_path_received_and_authentication_results(
        shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    m.dns.add("spf-pass.test", "TXT", "v=spf1 ip4:127.0.0.1 -all")
    raw = message("headers on top", sender="news@spf-pass.test",
                  headers=("Authentication-Results: mx.mailmesh.test; spf=pass (forged)", "X-Spam-Flag: NO",
                           "Return-Path: <forged@else.test>", "Content-Length: 3", "Bcc: hidden@else.test",
                           "Resent-Bcc: other@else.test"))
    assert await in_thread(send, m, raw, ["alice@example.com"], "news@spf-pass.test") == {}
    got = await m.wait_subject("alice", "headers on top")
    stored = await m.raw("alice", got.id)
    head = stored.split(b"\r\n\r\n")[0]
    lines = head.split(b"\r\n")
    assert lines[0] == b"Return-Path: <news@spf-pass.test>"
    assert lines[1].startswith(b"Received: from client.remote.test ([127.0.0.1])")
    assert b"by mx.mailmesh.test (mailmesh)" in head and b"with ESMTP id " in head
    assert b"for <alice@example.com>;" in head
    ar = [ln for ln in lines if ln.lower().startswith(b"authentication-results:")]
    assert len(ar) == 1, "the forged header claiming our authserv-id is removed (RFC 8601 5)"
    assert ar[0].startswith(b"Authentication-Results: mx.mailmesh.test")
    assert b"spf=pass" in head
    assert head.count(b"X-Spam-Flag:") <= 1 and b"(forged)" not in head
    # the sender's Return-Path, Content-Length, Bcc and Resent-Bcc are dropped
    assert head.count(b"Return-Path:") == 1 and b"else.test" not in head and b"Content-Length" not in head
    assert stored.endswith(raw.split(b"\r\n\r\n", 1)[1])  # the body is untouched


async def test_null_sender_is_accepted(shared_ingest: IngestMesh) -> None:
    raw = message("a bounce", sender="mailer-daemon@remote.test")
    assert await in_thread(send, shared_ingest, raw, ["bob@example.com"], "<>") == {}
    got = await shared_ingest.wait_subject("bob", "a bounce")
    assert (await shared_ingest.raw("bob", got.id)).startswith(b"Return-Path: <>\r\n")


async def test_8bit_body_is_delivered_byte_for_byte(shared_ingest: IngestMesh) -> None:
    body = "Grüße aus Köln — ünïcödé, 漢字\r\n".encode()
    raw = (b"From: s@remote.test\r\nTo: alice@example.com\r\nSubject: eight bit\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body)

    def run() -> dict[str, tuple[int, bytes]]:
        with shared_ingest.smtp() as s:
            return s.sendmail("s@remote.test", ["alice@example.com"], raw, mail_options=["BODY=8BITMIME"])

    assert await in_thread(run) == {}
    got = await shared_ingest.wait_subject("alice", "eight bit")
    assert (await shared_ingest.raw("alice", got.id)).endswith(b"\r\n\r\n" + body)


async def test_smtputf8_addresses(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    r = await m.mailbox.stub.CreateAccount(mb_pb.CreateAccountRequest(
        email="jörg@example.com", password="correct horse battery", display_name="Jörg"), metadata=m.mailbox.md())
    m.users["jörg"] = r.account.user_id
    raw = "From: Zoë <zoë@remote.test>\r\nTo: jörg@example.com\r\nSubject: utf8 envelope\r\n\r\nHallo\r\n".encode()

    def run() -> tuple[dict[str, tuple[int, bytes]], tuple[int, bytes]]:
        with m.smtp() as s:
            ok = s.sendmail("zoë@remote.test", ["jörg@example.com"], raw, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
            s.rset()
            s.command_encoding = "utf-8"  # an 8-bit client that did not say SMTPUTF8
            # without SMTPUTF8 a non-ASCII address is refused (RFC 6531 3.7.4.1)
            s.docmd("MAIL FROM:<plain@remote.test>")
            return ok, s.docmd("RCPT TO:<jörg@example.com>")

    ok, refused = await in_thread(run)
    assert ok == {}
    assert refused == (553, b"5.6.7 Non-ASCII address requires SMTPUTF8")
    got = await m.wait_subject("jörg", "utf8 envelope")
    stored = await m.raw("jörg", got.id)
    assert "Return-Path: <zoë@remote.test>".encode() in stored
    assert b"with UTF8SMTP id" in stored


async def test_pipelined_commands_get_replies_in_order(shared_ingest: IngestMesh) -> None:
    raw = message("pipelined")

    def run() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", shared_ingest.smtp_port), timeout=15) as sock:
            f = sock.makefile("rb")

            def reply() -> bytes:
                lines = []
                while True:
                    line = f.readline()
                    lines.append(line.rstrip(b"\r\n"))
                    if line[3:4] != b"-":
                        return b"\n".join(lines)

            reply()  # greeting
            sock.sendall(b"EHLO client.remote.test\r\n")
            assert b"PIPELINING" in reply()
            # RFC 2920: one batch up to DATA, then the data, the dot, and the next commands together
            sock.sendall(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.com>\r\n"
                         b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
            out = [reply() for _ in range(5)]
            sock.sendall(raw + b".\r\nMAIL FROM:<t@remote.test>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n")
            out += [reply() for _ in range(4)]
            sock.sendall(message("pipelined 2", to="carol@example.com") + b".\r\nQUIT\r\n")
            out += [reply() for _ in range(2)]
            return out

    out = await in_thread(run)
    assert out[0] == b"250 2.1.0 Sender OK"
    assert out[1] == b"250 2.1.5 Recipient OK"
    assert out[2] == b"550 5.1.1 No such user"
    assert out[3] == b"250 2.1.5 Recipient OK"
    assert out[4].startswith(b"354 ")
    assert out[5].startswith(b"250 2.0.0 OK: queued as ")
    assert out[6:8] == [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK"]
    assert out[8].startswith(b"354 ")
    assert out[9].startswith(b"250 2.0.0 OK: queued as ")
    assert out[10] == b"221 2.0.0 Bye"
    await shared_ingest.wait_subject("alice", "pipelined")
    await shared_ingest.wait_subject("bob", "pipelined")
    await shared_ingest.wait_subject("carol", "pipelined 2")


async def test_starttls_then_delivery_without_auth(shared_ingest: IngestMesh) -> None:
    raw = message("over tls", to="bob@example.com")

    def run() -> tuple[tuple[int, bytes], dict[str, str], dict[str, tuple[int, bytes]], str]:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # a self-signed certificate, as between MTAs (RFC 7435)
        with shared_ingest.smtp() as s:
            s.ehlo()
            reply = s.starttls(context=ctx)
            s.ehlo()
            features = dict(s.esmtp_features)
            version = s.sock.version() if isinstance(s.sock, ssl.SSLSocket) else ""
            return reply, features, s.sendmail("s@remote.test", ["bob@example.com"], raw), version or ""

    reply, features, refused, version = await in_thread(run)
    assert reply == (220, b"2.0.0 Ready to start TLS")
    assert "starttls" not in features and "auth" not in features
    assert refused == {}
    assert version in ("TLSv1.2", "TLSv1.3")
    got = await shared_ingest.wait_subject("bob", "over tls")
    head = (await shared_ingest.raw("bob", got.id)).split(b"\r\n\r\n")[0]
    assert b"with ESMTPS id" in head and version.encode() in head


async def test_generated_certificate_is_kept_in_the_data_dir(shared_ingest: IngestMesh) -> None:
    tls_dir = shared_ingest.settings.data_dir / "tls"
    assert (tls_dir / "smtp-cert.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert (tls_dir / "smtp-key.pem").stat().st_mode & 0o077 == 0


# --- authentication outcomes ---------------------------------------------------------------------

async def test_dmarc_reject_gets_550_at_end_of_data(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    m.dns.add("strict.test", "TXT", "v=spf1 -all")
    m.dns.add("_dmarc.strict.test", "TXT", "v=DMARC1; p=reject")
    before = await inbound_last_seq(m)
    with pytest.raises(smtplib.SMTPDataError) as err:
        await in_thread(send, m, message("spoofed", sender="ceo@strict.test"), ["alice@example.com"],
                        "ceo@strict.test")
    code, text = reply_of(err.value)
    assert code == 550 and text.startswith(b"5.7.1 ")
    assert await inbound_last_seq(m) == before


async def test_dmarc_quarantine_delivers_to_spam(shared_ingest: IngestMesh) -> None:
    m = shared_ingest
    m.dns.add("lax.test", "TXT", "v=spf1 -all")
    m.dns.add("_dmarc.lax.test", "TXT", "v=DMARC1; p=quarantine")
    assert await in_thread(send, m, message("quarantined", sender="boss@lax.test", to="carol@example.com"),
                           ["carol@example.com"], "boss@lax.test") == {}
    await m.wait_subject("carol", "quarantined", label="SPAM")
    assert not any(x.subject == "quarantined" for x in await m.messages("carol"))


# --- telemetry -----------------------------------------------------------------------------------

async def test_session_and_data_spans_and_the_trace_reaches_delivery(
        shared_ingest: IngestMesh, span_exporter: InMemorySpanExporter) -> None:
    assert await in_thread(send, shared_ingest, message("traced"), ["alice@example.com"]) == {}
    await shared_ingest.wait_subject("alice", "traced")
    for _ in range(100):
        spans = span_exporter.get_finished_spans()
        if any(s.name == "inbound.consume" for s in spans) and any(s.name == "smtp.session" for s in spans):
            break
        await asyncio.sleep(0.05)
    by_name = {s.name: s for s in spans}
    session, data = by_name["smtp.session"], by_name["smtp.data"]
    assert data.parent is not None and data.parent.span_id == session.context.span_id
    assert data.attributes is not None and data.attributes["smtp.reply"] == 250
    consume = [s for s in spans if s.name == "inbound.consume"]
    assert any(s.context.trace_id == data.context.trace_id for s in consume)

