"""postmaster@ and abuse@ of every local domain (RFC 5321 4.5.1 MUST, RFC 2142): with the
`postmaster` setting they reach that account unless an account or alias has the address itself,
and a bare <Postmaster> (RFC 5321 4.1.1.3) is accepted. Real SMTP (smtplib) into svc_ingest,
delivered by svc_mailbox."""

from __future__ import annotations

from pathlib import Path

from mailmesh.v1 import mailbox_service_pb2 as mb_pb

from tests.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)
from tests.svc_ingest.conftest import Nats, in_thread, message, start_ingest_mesh, stop_ingest_mesh
from tests.svc_ingest.test_smtp import dialog, send


async def test_postmaster_and_abuse_reach_the_configured_account(tmp_path: Path, nats: Nats,
                                                                  dns_server: DnsServer) -> None:  # noqa: F811
    m = await start_ingest_mesh(tmp_path, nats, dns_server, postmaster="Carol@Example.com")
    try:
        replies = await in_thread(dialog, m, "MAIL FROM:<>", "RCPT TO:<Postmaster>", "RCPT TO:<POSTMASTER@example.com>",
                                  "RCPT TO:<abuse@EXAMPLE.COM>", "RCPT TO:<webmaster@example.com>")
        assert replies[1:] == [(250, b"2.1.5 Recipient OK")] * 3 + [(550, b"5.1.1 No such user")]

        # a bounce to the bare <postmaster>, and a report to abuse@: both in carol's INBOX
        assert await in_thread(send, m, message("undeliverable", to="postmaster"), ["postmaster"], "<>") == {}
        assert await in_thread(send, m, message("spam report", to="abuse@example.com"), ["abuse@example.com"]) == {}
        await m.wait_subject("carol", "undeliverable")
        await m.wait_subject("carol", "spam report")

        # an account of its own for abuse@ takes that mail; postmaster@ still goes to carol
        dan = await m.mailbox.stub.CreateAccount(mb_pb.CreateAccountRequest(
            email="dan@example.com", password="correct horse battery", aliases=["abuse@example.com"]),
            metadata=m.mailbox.md())
        m.users["dan"] = dan.account.user_id
        assert await in_thread(send, m, message("second report", to="abuse@example.com"),
                               ["abuse@example.com"]) == {}
        await m.wait_subject("dan", "second report")
        assert all(msg.subject != "second report" for msg in await m.messages("carol"))
    finally:
        await stop_ingest_mesh(m)


async def test_without_the_setting_postmaster_is_an_unknown_user(tmp_path: Path, nats: Nats,
                                                                 dns_server: DnsServer) -> None:  # noqa: F811
    m = await start_ingest_mesh(tmp_path, nats, dns_server)
    try:
        replies = await in_thread(dialog, m, "MAIL FROM:<>", "RCPT TO:<postmaster>", "RCPT TO:<postmaster@example.com>")
        # a clear refusal (the bare form is valid syntax, so not 501)
        assert replies[1:] == [(550, b"5.1.1 No such user")] * 2
    finally:
        await stop_ingest_mesh(m)
