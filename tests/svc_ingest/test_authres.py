"""The Authentication-Results header (RFC 8601) built from SPF, DKIM and DMARC results."""

from __future__ import annotations

import re

from mailmesh_common.dns import Resolver
from svc_ingest.checks.authres import authentication_results
from svc_ingest.checks.dkim import DkimResult, verify_dkim
from svc_ingest.checks.dmarc import DmarcResult, check_dmarc
from svc_ingest.checks.spf import SpfResult, check_spf
from tests import dnsserver
from tests.dnsserver import DnsServer

dns_server = dnsserver.dns_server  # the fixture, requested by name below

SPF_PASS = SpfResult("pass", "example.com", "mailfrom", "sender SPF authorized")
DKIM_PASS = DkimResult("pass", "example.com", "s1", "rsa-sha256", "")
DMARC_PASS = DmarcResult("pass", "example.com", "reject", "none")


def test_all_pass() -> None:
    value = authentication_results("mx.mailmesh.test", SPF_PASS, [DKIM_PASS], DMARC_PASS)
    assert value == ("mx.mailmesh.test; spf=pass smtp.mailfrom=example.com; "
                     "dkim=pass header.d=example.com header.s=s1 header.a=rsa-sha256; "
                     "dmarc=pass (p=reject dis=none) header.from=example.com")


def test_unsigned_message_says_dkim_none() -> None:
    value = authentication_results("mx.mailmesh.test", SPF_PASS, [], DmarcResult("none", "example.com", "none", "none"))
    assert "; dkim=none; " in value
    assert value.endswith("dmarc=none header.from=example.com")


def test_every_signature_is_listed_with_its_reason() -> None:
    sigs = [DkimResult("fail", "example.com", "s1", "rsa-sha256", "body hash mismatch"),
            DkimResult("policy", "lists.example.org", "old", "rsa-sha1", "rsa-sha1 not allowed (RFC 8301)")]
    value = authentication_results("mx.mailmesh.test", SpfResult("fail", "example.com", "mailfrom", "SPF fail - not authorized"),
                                   sigs, DmarcResult("fail", "example.com", "quarantine", "quarantine"))
    assert value == (
        "mx.mailmesh.test; spf=fail (SPF fail - not authorized) smtp.mailfrom=example.com; "
        "dkim=fail (body hash mismatch) header.d=example.com header.s=s1 header.a=rsa-sha256; "
        "dkim=policy (rsa-sha1 not allowed \\(RFC 8301\\)) header.d=lists.example.org header.s=old header.a=rsa-sha1; "
        "dmarc=fail (p=quarantine dis=quarantine) header.from=example.com")


def test_helo_scope_and_header_from() -> None:
    value = authentication_results("mx", SpfResult("none", "mx1.example.net", "helo", ""), [],
                                   DmarcResult("none", "example.com", "none", "none"), header_from="Example.COM")
    assert "spf=none smtp.helo=mx1.example.net;" in value
    assert value.endswith("header.from=Example.COM")


def test_remote_text_cannot_inject_header_lines() -> None:
    evil = SpfResult("fail", "example.com", "mailfrom", "bad)\r\nX-Injected: yes (\\")
    sig = DkimResult("fail", 'ex"ample.com\r\n', "s;1", "rsa-sha256", "x" * 500)
    value = authentication_results("mx", evil, [sig], DmarcResult("fail", "example.com", "reject", "reject"))
    assert "\r" not in value and "\n" not in value
    assert "spf=fail (bad\\) X-Injected: yes \\(\\\\) smtp.mailfrom=example.com" in value
    assert 'header.d="ex\\"ample.com"' in value and 'header.s="s;1"' in value
    assert re.search(r"dkim=fail \(x{97}\.\.\.\)", value)


async def test_real_unsigned_message_reports_dkim_none(dns_server: DnsServer) -> None:
    resolver = Resolver([dns_server.address], timeout_s=1.0, lifetime_s=2.0)
    dns_server.add("example.com", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=none")
    raw = b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nhello\r\n"
    spf = await check_spf(resolver, "192.0.2.1", "alice@example.com", "mail.example.com")
    dkim = await verify_dkim(resolver, raw)
    assert dkim == []
    dmarc = await check_dmarc(resolver, "example.com", spf, dkim)
    assert authentication_results("mx.mailmesh.test", spf, dkim, dmarc) == (
        "mx.mailmesh.test; spf=pass smtp.mailfrom=example.com; dkim=none; "
        "dmarc=pass (p=none dis=none) header.from=example.com")
