"""SMTP submission with a real client (smtplib, in a thread): STARTTLS, AUTH PLAIN and LOGIN
checked against the mailbox, MAIL FROM limited to the account's addresses, then the same
pipeline as the Send RPC (signed, Bcc stripped, SENT copy, local and remote delivery)."""

from __future__ import annotations

import asyncio
import dataclasses
import smtplib
import ssl
import time
from typing import Any

import pytest

from mailmesh_common.dns import Resolver
from svc_ingest.checks.dkim import verify_dkim
from svc_send.submission import SubmissionServer
from tests.svc_mailbox.conftest import free_port
from tests.svc_send.conftest import REMOTE, SendMesh, wait_for

PASSWORD = "correct horse battery"
MESSAGE = (f"From: Alice <alice@example.com>\r\nTo: dave@{REMOTE}, bob@example.com\r\n"
           "Bcc: carol@example.com\r\nSubject: from my desktop client\r\n\r\nHello from Thunderbird.\r\n")


def _tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the dev certificate is self-signed
    return ctx


def _client(port: int) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, timeout=20)
    s.ehlo("desktop.example")
    return s


async def _in_inbox(sm: SendMesh, user: str, subject: str) -> bool:
    return any(m.subject == subject for m in await sm.label(user, "INBOX"))


@pytest.mark.send_settings(undo_send_s=30)  # no undo for SMTP clients: released at once
async def test_authenticated_submission_over_starttls_is_sent(sm: SendMesh) -> None:
    port = sm.send.submission.port
    await sm.add_user("carol")

    def submit() -> tuple[Any, ...]:
        with _client(port) as s:
            assert s.has_extn("starttls")
            s.starttls(context=_tls())
            s.ehlo("desktop.example")
            assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
            code, _ = s.login("alice@example.com", PASSWORD)
            refused = s.sendmail("alice@example.com", [f"dave@{REMOTE}", "bob@example.com", "carol@example.com"],
                                 MESSAGE.encode())
            return code, refused

    code, refused = await asyncio.to_thread(submit)
    assert code == 235 and refused == {}
    await wait_for(lambda: _got(sm), "the remote delivery")
    got = sm.sink.messages[0]
    assert got.rcpts == [f"dave@{REMOTE}"]
    head = got.data.split(b"\r\n\r\n", 1)[0]
    assert b"Bcc:" not in head and b"carol@" not in head
    assert b"with ESMTPSA id" in head and b"Message-ID: <" in head and b"Date: " in head
    results = await verify_dkim(Resolver([sm.dns.address]), got.data)
    assert {x.result for x in results} == {"pass"} and len(results) == 2
    await wait_for(lambda: _in_inbox(sm, sm.users["bob"], "from my desktop client"), "bob's copy")
    await wait_for(lambda: _in_inbox(sm, sm.users["carol"], "from my desktop client"), "carol's Bcc copy")
    sent = await sm.label(sm.users["alice"], "SENT")
    assert [m.subject for m in sent] == ["from my desktop client"]


async def _got(sm: SendMesh) -> bool:
    return bool(sm.sink.messages)


async def test_auth_login_works_and_a_wrong_password_is_refused(sm: SendMesh) -> None:
    port = sm.send.submission.port

    def run() -> tuple[Any, Any]:
        with _client(port) as s:
            s.starttls(context=_tls())
            s.ehlo("desktop.example")
            with pytest.raises(smtplib.SMTPAuthenticationError) as err:
                s.login("alice@example.com", "wrong password")
            wrong = (err.value.smtp_code, err.value.smtp_error)
            s.user, s.password = "alice@example.com", PASSWORD
            ok = s.auth("LOGIN", s.auth_login)
            return wrong, ok

    wrong, ok = await asyncio.to_thread(run)
    assert wrong == (535, b"5.7.8 Authentication credentials invalid")
    assert ok[0] == 235


async def test_mail_from_must_be_the_users_own_address(sm: SendMesh) -> None:
    port = sm.send.submission.port

    def run() -> tuple[Any, ...]:
        with _client(port) as s:
            unauthenticated = s.mail("alice@example.com")
            s.rset()
            s.login("alice@example.com", PASSWORD)  # loopback: allowed without TLS in dev
            forged = s.mail("bob@example.com")
            s.rset()
            ok = s.mail("ALICE@example.com")
            unknown = s.rcpt("nobody@example.com")
            return unauthenticated, forged, ok, unknown

    unauthenticated, forged, ok, unknown = await asyncio.to_thread(run)
    assert unauthenticated[0] == 530
    assert forged == (553, b"5.7.1 Sender address rejected: not owned by the authenticated user")
    assert ok[0] == 250
    assert unknown == (550, b"5.1.1 No such user")
    assert sm.sink.messages == []


async def test_auth_needs_tls_when_the_loopback_exemption_is_off(sm: SendMesh) -> None:
    assert sm.settings is not None
    strict = dataclasses.replace(sm.settings, submission_port=0, submission_auth_loopback_plaintext=False)
    live = sm.send.submission
    server = SubmissionServer(strict, live.outbox, live.mailbox, live.tls_context, live.hostname)
    port = await server.start()
    try:
        def run() -> tuple[Any, ...]:
            with _client(port) as s:
                advertised = "auth" in s.esmtp_features
                plain = s.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUuY29tAGNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==")
                s.starttls(context=_tls())
                s.ehlo("desktop.example")
                code, _ = s.login("alice@example.com", PASSWORD)
                return advertised, plain, code

        advertised, plain, code = await asyncio.to_thread(run)
    finally:
        await server.close()
    assert not advertised
    assert plain[0] == 538
    assert code == 235


async def test_implicit_tls_submission_authenticates_at_once_and_sends(sm: SendMesh) -> None:
    assert sm.settings is not None
    tls_settings = dataclasses.replace(sm.settings, submission_port=0, submissions_port=free_port(),
                                       submission_auth_loopback_plaintext=False)
    live = sm.send.submission
    server = SubmissionServer(tls_settings, live.outbox, live.mailbox, live.tls_context, live.hostname)
    await server.start()
    try:
        def run() -> tuple[Any, ...]:
            with smtplib.SMTP_SSL("127.0.0.1", server.tls_port, timeout=20, context=_tls()) as s:
                s.ehlo("desktop.example")
                features = dict(s.esmtp_features)
                code, _ = s.login("alice@example.com", PASSWORD)  # no STARTTLS needed: TLS from the start
                refused = s.sendmail("alice@example.com", [f"dave@{REMOTE}"],
                                     MESSAGE.replace("from my desktop client", "over port 465").encode())
                return features, code, refused

        features, code, refused = await asyncio.to_thread(run)
    finally:
        await server.close()
    assert "starttls" not in features and "PLAIN" in features["auth"]
    assert code == 235 and refused == {}
    await wait_for(lambda: _got(sm), "the remote delivery")
    assert b"Subject: over port 465" in sm.sink.messages[0].data


@pytest.mark.send_settings(smtp_timeout_s=1.5)
async def test_a_slow_upload_is_served_as_long_as_it_keeps_coming(sm: SendMesh) -> None:
    """smtp_timeout_s bounds silence: a DATA that lasts longer than it, but never pauses that long,
    is accepted (a big attachment over a slow uplink)."""
    port = sm.send.submission.port
    raw = ("From: Alice <alice@example.com>\r\nTo: bob@example.com\r\nSubject: slow upload\r\n\r\n"
           + "a line of a large attachment\r\n" * 800).encode()

    def submit() -> tuple[int, bytes]:
        with _client(port) as s:
            s.starttls(context=_tls())
            s.ehlo("desktop.example")
            s.login("alice@example.com", PASSWORD)
            s.mail("alice@example.com")
            s.rcpt("bob@example.com")
            assert s.docmd("DATA")[0] == 354
            step = len(raw) // 12 + 1
            for i in range(0, len(raw), step):  # 12 pieces 0.3 s apart: 3.6 s of DATA
                s.send(raw[i:i + step])
                time.sleep(0.3)
            s.send(b".\r\n")
            return s.getreply()

    code, _ = await asyncio.to_thread(submit)
    assert code == 250
    await wait_for(lambda: _in_inbox(sm, sm.users["bob"], "slow upload"), "bob's copy")


def _connect_reply(port: int) -> tuple[int, bytes]:
    """The greeting, or the refusal, a new connection gets."""
    try:
        s = smtplib.SMTP("127.0.0.1", port, timeout=20)
    except smtplib.SMTPConnectError as exc:
        return exc.smtp_code, exc.smtp_error
    s.close()
    return 220, b""


@pytest.mark.send_settings(submission_max_connections=2)
async def test_connections_past_the_process_limit_get_421(sm: SendMesh) -> None:
    port = sm.send.submission.port
    first, second = await asyncio.to_thread(_client, port), await asyncio.to_thread(_client, port)
    try:
        assert await asyncio.to_thread(_connect_reply, port) == (421, b"4.3.2 Too many connections, try again later")
    finally:
        await asyncio.to_thread(first.close)
        await asyncio.to_thread(second.close)
    await wait_for(lambda: _reply_is(port, 220), "a free session")


@pytest.mark.send_settings(submission_per_ip_max_connections=1)
async def test_connections_past_the_per_ip_limit_get_421_and_noop_floods_are_cut_off(sm: SendMesh) -> None:
    port = sm.send.submission.port
    first = await asyncio.to_thread(_client, port)
    try:
        assert await asyncio.to_thread(_connect_reply, port) == (
            421, b"4.7.0 Too many connections from your address, try again later")
        replies = await asyncio.to_thread(lambda: [first.docmd("NOOP") for _ in range(101)])
        assert replies[:100] == [(250, b"OK")] * 100 and replies[100] == (421, b"4.7.0 NOOP sent too many times")
    finally:
        await asyncio.to_thread(first.close)
    await wait_for(lambda: _reply_is(port, 220), "the address's slot to be free")


async def _reply_is(port: int, code: int) -> bool:
    return (await asyncio.to_thread(_connect_reply, port))[0] == code
