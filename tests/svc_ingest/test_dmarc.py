"""DMARC (RFC 7489) against policy records in a real DNS server: discovery, alignment, policy."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import dkim
import nacl.signing
import pytest

from mailmesh_common.dns import Resolver
from svc_ingest.checks.dkim import DkimResult, verify_dkim
from svc_ingest.checks.dmarc import (
    DmarcRecord,
    DmarcResult,
    aligned,
    check_dmarc,
    organizational_domain,
    parse_record,
)
from svc_ingest.checks.spf import SpfResult, check_spf
from tests import dnsserver
from tests.dnsserver import DnsServer

dns_server = dnsserver.dns_server  # the fixture, requested by name below

SPF_NONE = SpfResult("none", "", "mailfrom", "")


def spf(result: str, domain: str, scope: str = "mailfrom") -> SpfResult:
    return SpfResult(result, domain, scope, "")


def dkim_result(result: str, domain: str) -> DkimResult:
    return DkimResult(result, domain, "sel", "rsa-sha256", "")


@pytest.fixture
def resolver(dns_server: DnsServer) -> Iterator[Resolver]:
    yield Resolver([dns_server.address], timeout_s=1.0, lifetime_s=2.0)


# --- organizational domains and records (no DNS) -------------------------------------------------

@pytest.mark.parametrize(("domain", "org"), [
    ("a.b.example.co.uk", "example.co.uk"),
    ("example.co.uk", "example.co.uk"),
    ("mail.Example.COM.", "example.com"),
    ("example.com", "example.com"),
    ("co.uk", "co.uk"),  # a public suffix is its own organizational domain
    ("a.b.c.kawasaki.jp", "b.c.kawasaki.jp"),  # wildcard rule *.kawasaki.jp
    ("city.kawasaki.jp", "city.kawasaki.jp"),  # exception rule !city.kawasaki.jp
    ("bob.github.io", "bob.github.io"),  # private section: one owner per github.io name
    ("x.y.unknowntld", "y.unknowntld"),
])
def test_organizational_domain(domain: str, org: str) -> None:
    assert organizational_domain(domain) == org


def test_record_parsing() -> None:
    assert parse_record("v=DMARC1; p=reject") == DmarcRecord(p="reject")
    assert parse_record("v = DMARC1 ;P=Quarantine; SP=none; adkim=s; aspf=S; pct=25; rua=mailto:d@example.com") == \
        DmarcRecord(p="quarantine", sp="none", adkim="s", aspf="s", pct=25, rua_valid=True)
    assert parse_record("v=DMARC1; p=reject; pct=150; adkim=x; foo=bar") == DmarcRecord(p="reject")
    assert parse_record("v=dmarc1; p=reject") is None  # the version is case-sensitive
    assert parse_record("p=reject; v=DMARC1") is None  # v= must come first
    assert parse_record("v=spf1 -all") is None
    bad = parse_record("v=DMARC1; p=bogus")
    assert bad is not None and not bad.usable
    bad_sp = parse_record("v=DMARC1; p=reject; sp=bogus")
    assert bad_sp is not None and not bad_sp.usable
    reporting = parse_record("v=DMARC1; rua=mailto:dmarc@example.com")
    assert reporting is not None and reporting.usable and reporting.p is None


def test_alignment_modes() -> None:
    assert aligned("bounce.example.com", "example.com", "r")
    assert aligned("a.example.co.uk", "b.example.co.uk", "r")
    assert not aligned("bounce.example.com", "example.com", "s")
    assert aligned("EXAMPLE.com.", "example.com", "s")
    assert not aligned("example.net", "example.com", "r")
    assert not aligned("other.co.uk", "example.co.uk", "r")
    assert not aligned("", "example.com", "r")


# --- check_dmarc --------------------------------------------------------------------------------

async def test_pass_through_spf_alignment_only(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    got = await check_dmarc(resolver, "example.com", spf("pass", "bounces.example.com"), [])
    assert got == DmarcResult("pass", "example.com", "reject", "none")


async def test_pass_through_dkim_alignment_only(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    dkims = [dkim_result("pass", "other.example"), dkim_result("pass", "mail.example.com")]
    got = await check_dmarc(resolver, "example.com", spf("fail", "example.com"), dkims)
    assert got == DmarcResult("pass", "example.com", "reject", "none")


async def test_unaligned_passes_fail_with_reject(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    got = await check_dmarc(resolver, "example.com", spf("pass", "attacker.example"),
                            [dkim_result("pass", "attacker.example"), dkim_result("fail", "example.com")])
    assert got == DmarcResult("fail", "example.com", "reject", "reject")


async def test_fail_with_quarantine_and_none(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.q.example", "TXT", "v=DMARC1; p=quarantine")
    dns_server.add("_dmarc.n.example", "TXT", "v=DMARC1; p=none; rua=mailto:r@n.example")
    assert await check_dmarc(resolver, "q.example", SPF_NONE, []) == \
        DmarcResult("fail", "q.example", "quarantine", "quarantine")
    assert await check_dmarc(resolver, "n.example", SPF_NONE, []) == DmarcResult("fail", "n.example", "none", "none")


async def test_subdomain_uses_sp_of_the_organizational_domain(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.example.co.uk", "TXT", "v=DMARC1; p=reject; sp=quarantine")
    got = await check_dmarc(resolver, "a.b.example.co.uk", SPF_NONE, [])
    assert got == DmarcResult("fail", "a.b.example.co.uk", "quarantine", "quarantine")
    assert (await check_dmarc(resolver, "example.co.uk", SPF_NONE, [])).policy == "reject"
    # a record at the subdomain itself wins, with its p=
    dns_server.add("_dmarc.c.example.co.uk", "TXT", "v=DMARC1; p=none; sp=reject")
    assert (await check_dmarc(resolver, "c.example.co.uk", SPF_NONE, [])).policy == "none"


async def test_subdomain_without_sp_inherits_p(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    assert (await check_dmarc(resolver, "news.example.com", SPF_NONE, [])).disposition == "reject"


async def test_strict_alignment(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject; aspf=s; adkim=s")
    sub_spf, sub_dkim = spf("pass", "bounces.example.com"), [dkim_result("pass", "mail.example.com")]
    assert (await check_dmarc(resolver, "example.com", sub_spf, sub_dkim)).result == "fail"
    assert (await check_dmarc(resolver, "example.com", spf("pass", "example.com"), [])).result == "pass"
    assert (await check_dmarc(resolver, "example.com", SPF_NONE, [dkim_result("pass", "Example.com")])).result == "pass"
    dns_server.add("_dmarc.example.net", "TXT", "v=DMARC1; p=reject")  # relaxed by default
    net_spf, net_dkim = spf("pass", "bounces.example.net"), [dkim_result("pass", "mail.example.net")]
    assert (await check_dmarc(resolver, "example.net", net_spf, [])).result == "pass"
    assert (await check_dmarc(resolver, "example.net", SPF_NONE, net_dkim)).result == "pass"


async def test_helo_identity_counts_for_null_mail_from(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    got = await check_dmarc(resolver, "example.com", spf("pass", "mx1.example.com", "helo"), [])
    assert got.result == "pass"


async def test_no_record_is_none(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "some other verification token")
    assert await check_dmarc(resolver, "example.com", SPF_NONE, []) == DmarcResult("none", "example.com", "none", "none")


async def test_multiple_records_is_none(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=none")
    assert (await check_dmarc(resolver, "example.com", SPF_NONE, [])).result == "none"
    # and discovery stops there: the organizational domain's record is not consulted
    dns_server.add("_dmarc.sub.example.org", "TXT", "v=DMARC1; p=reject")
    dns_server.add("_dmarc.sub.example.org", "TXT", "v=DMARC1; p=reject; rua=mailto:a@example.org")
    dns_server.add("_dmarc.example.org", "TXT", "v=DMARC1; p=reject")
    assert (await check_dmarc(resolver, "sub.example.org", SPF_NONE, [])).result == "none"


async def test_invalid_policy_is_none_unless_rua_is_valid(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.bad.example", "TXT", "v=DMARC1; p=bogus")
    assert (await check_dmarc(resolver, "bad.example", SPF_NONE, [])).result == "none"
    # RFC 7489 6.6.3 step 6: with a valid rua= it acts as p=none
    dns_server.add("_dmarc.rua.example", "TXT", "v=DMARC1; p=bogus; rua=mailto:agg@rua.example")
    assert await check_dmarc(resolver, "rua.example", SPF_NONE, []) == DmarcResult("fail", "rua.example", "none", "none")


async def test_pct_downgrades_the_policy_of_unsampled_mail(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.zero.example", "TXT", "v=DMARC1; p=reject; pct=0")
    dns_server.add("_dmarc.half.example", "TXT", "v=DMARC1; p=quarantine; pct=50")
    assert await check_dmarc(resolver, "zero.example", SPF_NONE, []) == \
        DmarcResult("fail", "zero.example", "quarantine", "quarantine")
    dispositions = {(await check_dmarc(resolver, "half.example", SPF_NONE, [], sample_key=f"id-{i}")).disposition
                    for i in range(40)}
    assert dispositions == {"quarantine", "none"}
    again = [await check_dmarc(resolver, "half.example", SPF_NONE, [], sample_key="id-7") for _ in range(3)]
    assert len(set(again)) == 1  # the same key always samples the same way


async def test_dns_failure_is_temperror(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.fail("_dmarc.example.com", "servfail")
    assert (await check_dmarc(resolver, "example.com", SPF_NONE, [])).result == "temperror"


async def test_aligned_temporary_failure_is_temperror_not_fail(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    got = await check_dmarc(resolver, "example.com", spf("fail", "example.com"), [dkim_result("temperror", "example.com")])
    assert (got.result, got.disposition) == ("temperror", "none")


async def test_from_domain_that_is_no_domain_is_permerror(resolver: Resolver) -> None:
    assert (await check_dmarc(resolver, "not a domain", SPF_NONE, [])).result == "permerror"
    assert (await check_dmarc(resolver, "", SPF_NONE, [])).result == "permerror"


async def test_end_to_end_with_real_spf_and_dkim(dns_server: DnsServer, resolver: Resolver) -> None:
    """A message signed by example.com but relayed from an unlisted host: DKIM carries DMARC."""
    sk = nacl.signing.SigningKey.generate()
    dns_server.add("ed._domainkey.example.com", "TXT",
                   f"v=DKIM1; k=ed25519; p={base64.b64encode(bytes(sk.verify_key)).decode()}")
    dns_server.add("example.com", "TXT", "v=spf1 ip4:192.0.2.0/24 -all")
    dns_server.add("_dmarc.example.com", "TXT", "v=DMARC1; p=reject")
    message = b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHi Bob\r\n"
    signed = dkim.sign(message, b"ed", b"example.com", base64.b64encode(bytes(sk)),
                       signature_algorithm=b"ed25519-sha256", include_headers=[b"from", b"to", b"subject"]) + message
    spf_result = await check_spf(resolver, "198.51.100.7", "alice@example.com", "relay.example.net")
    assert spf_result.result == "fail"
    got = await check_dmarc(resolver, "example.com", spf_result, await verify_dkim(resolver, signed))
    assert got == DmarcResult("pass", "example.com", "reject", "none")
    tampered = signed.replace(b"Hi Bob", b"Pay Eve")
    got = await check_dmarc(resolver, "example.com", spf_result, await verify_dkim(resolver, tampered))
    assert got == DmarcResult("fail", "example.com", "reject", "reject")
