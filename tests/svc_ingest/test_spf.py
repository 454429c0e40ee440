"""SPF checks against a real DNS server, and the resolver path they run on (MAILMESH_DNS_SERVERS
→ Resolver → loopback DNS server)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from mailmesh_common.config import load_settings
from mailmesh_common.dns import DnsNotFound, DnsTempError, Resolver, parse_server
from mailmesh_common.errors import ConfigError, InvalidInput, Unavailable
from svc_ingest.checks.spf import SpfResult, check_spf
from tests import dnsserver
from tests.dnsserver import DnsServer

dns_server = dnsserver.dns_server  # the fixture, requested by name below


@pytest.fixture
def resolver(dns_server: DnsServer) -> Iterator[Resolver]:
    yield Resolver([dns_server.address], timeout_s=0.3, lifetime_s=0.6)


@pytest.fixture
def example(dns_server: DnsServer) -> DnsServer:
    dns_server.add("example.com", "TXT", "v=spf1 ip4:192.0.2.0/24 mx include:_spf.example.net -all")
    dns_server.add("example.com", "TXT", "google-site-verification=abc")  # not SPF: ignored
    dns_server.add("example.com", "MX", (10, "mx.example.com"))
    dns_server.add("mx.example.com", "A", "198.51.100.25")
    dns_server.add("mx.example.com", "AAAA", "2001:db8::25")
    dns_server.add("_spf.example.net", "TXT", "v=spf1 ip4:203.0.113.0/28 ?all")
    dns_server.add("soft.example.com", "TXT", "v=spf1 ip4:192.0.2.1 ~all")
    dns_server.add("neutral.example.com", "TXT", "v=spf1 ?all")
    dns_server.add("exp.example.com", "TXT", "v=spf1 -all exp=why.example.com")
    dns_server.add("why.example.com", "TXT", "%{i} is not one of %{d}'s servers")
    return dns_server


# --- results ----------------------------------------------------------------------------------

async def test_authorized_ip_passes(example: DnsServer, resolver: Resolver) -> None:
    got = await check_spf(resolver, "192.0.2.10", "alice@example.com", "mail.example.com")
    assert (got.result, got.domain, got.scope) == ("pass", "example.com", "mailfrom")


async def test_mx_and_include_mechanisms_pass(example: DnsServer, resolver: Resolver) -> None:
    assert (await check_spf(resolver, "198.51.100.25", "a@example.com", "x")).result == "pass"
    assert (await check_spf(resolver, "2001:db8::25", "a@example.com", "x")).result == "pass"
    assert (await check_spf(resolver, "203.0.113.5", "a@example.com", "x")).result == "pass"


async def test_ipv4_mapped_client_address_counts_as_ipv4(example: DnsServer, resolver: Resolver) -> None:
    assert (await check_spf(resolver, "::ffff:192.0.2.10", "a@example.com", "x")).result == "pass"


async def test_unauthorized_ip_fails(example: DnsServer, resolver: Resolver) -> None:
    got = await check_spf(resolver, "198.51.100.99", "<alice@example.com>", "mail.example.com")
    assert got == SpfResult("fail", "example.com", "mailfrom", "SPF fail - not authorized")


async def test_fail_carries_the_domains_explanation(example: DnsServer, resolver: Resolver) -> None:
    got = await check_spf(resolver, "198.51.100.99", "bob@exp.example.com", "x")
    assert got.result == "fail"
    assert got.explanation == "198.51.100.99 is not one of exp.example.com's servers"


async def test_softfail_and_neutral(example: DnsServer, resolver: Resolver) -> None:
    assert (await check_spf(resolver, "192.0.2.99", "a@soft.example.com", "x")).result == "softfail"
    assert (await check_spf(resolver, "192.0.2.99", "a@neutral.example.com", "x")).result == "neutral"


async def test_domain_without_spf_record_is_none(example: DnsServer, resolver: Resolver) -> None:
    got = await check_spf(resolver, "192.0.2.10", "a@nospf.example.org", "x")
    assert (got.result, got.domain) == ("none", "nospf.example.org")


async def test_servfail_is_temperror(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.fail("broken.example", "servfail")
    got = await check_spf(resolver, "192.0.2.10", "a@broken.example", "x")
    assert got.result == "temperror"


async def test_timeout_is_temperror(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.fail("slow.example", "timeout")
    started = time.monotonic()
    got = await check_spf(resolver, "192.0.2.10", "a@slow.example", "x")
    assert got.result == "temperror"
    assert time.monotonic() - started < 5


async def test_broken_record_is_permerror(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("typo.example", "TXT", "v=spf1 ip4:192.0.2.0/24 mx:  -al")
    dns_server.add("two.example", "TXT", "v=spf1 -all")
    dns_server.add("two.example", "TXT", "v=spf1 +all")
    assert (await check_spf(resolver, "192.0.2.10", "a@typo.example", "x")).result == "permerror"
    assert (await check_spf(resolver, "192.0.2.10", "a@two.example", "x")).result == "permerror"


async def test_too_many_void_lookups_is_permerror(dns_server: DnsServer, resolver: Resolver) -> None:
    # RFC 7208 4.6.4: more than two lookups returning nothing
    dns_server.add("void.example", "TXT", "v=spf1 a:n1.void.example a:n2.void.example a:n3.void.example -all")
    assert (await check_spf(resolver, "192.0.2.10", "a@void.example", "x")).result == "permerror"


async def test_null_mail_from_checks_helo(example: DnsServer, resolver: Resolver) -> None:
    example.add("mail.example.org", "TXT", "v=spf1 a -all")
    example.add("mail.example.org", "A", "192.0.2.77")
    got = await check_spf(resolver, "192.0.2.77", "<>", "mail.example.org")
    assert (got.result, got.domain, got.scope) == ("pass", "mail.example.org", "helo")
    got = await check_spf(resolver, "192.0.2.78", "", "mail.example.org")
    assert (got.result, got.scope) == ("fail", "helo")


async def test_bad_client_address_is_invalid_input(resolver: Resolver) -> None:
    with pytest.raises(InvalidInput):
        await check_spf(resolver, "not-an-ip", "a@example.com", "x")


# --- the resolver ------------------------------------------------------------------------------

def test_dns_servers_setting_builds_the_resolver(dns_server: DnsServer) -> None:
    settings = load_settings(env={"MAILMESH_DNS_SERVERS": f"{dns_server.address}, 192.0.2.53"})
    resolver = Resolver.from_settings(settings)
    assert resolver.servers == (dns_server.address, "192.0.2.53:53")
    assert parse_server("[::1]:5353") == ("::1", 5353)
    assert parse_server("2001:db8::53") == ("2001:db8::53", 53)
    with pytest.raises(ConfigError):
        parse_server("dns.example.com:53")


async def test_mx_sorted_by_preference_and_null_mx(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("example.com", "MX", (20, "backup.example.com"))
    dns_server.add("example.com", "MX", "10 Primary.Example.com.")
    dns_server.add("nomail.example", "MX", (0, "."))  # RFC 7505
    assert await resolver.mx("example.com") == [(10, "primary.example.com"), (20, "backup.example.com")]
    assert await resolver.mx("nomail.example") == [(0, "")]
    assert await resolver.mx("nothing.example") == []


async def test_a_aaaa_ptr_and_cname(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("host.example", "A", "192.0.2.1")
    dns_server.add("host.example", "AAAA", "2001:db8::1")
    dns_server.add("alias.example", "CNAME", "host.example")
    dns_server.add("1.2.0.192.in-addr.arpa", "PTR", "Host.example.")
    assert await resolver.a("alias.example") == ["192.0.2.1"]
    assert await resolver.aaaa("host.example") == ["2001:db8::1"]
    assert await resolver.ptr("192.0.2.1") == ["host.example"]
    with pytest.raises(InvalidInput):
        await resolver.ptr("nope")


async def test_cname_loop_is_no_data(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("loop.example", "CNAME", "loop.example")
    assert await resolver.a("loop.example") == []


async def test_long_txt_is_joined_and_fetched_over_tcp(dns_server: DnsServer, resolver: Resolver) -> None:
    record = "v=spf1 " + " ".join(f"ip4:198.51.100.{i}" for i in range(1, 120)) + " -all"
    assert len(record) > 1232  # over one TXT string, and over the EDNS UDP size: TC, then TCP
    dns_server.add("big.example", "TXT", record)
    assert await resolver.txt("big.example") == [record]
    assert resolver.sync_txt("big.example") == [record]
    assert ("big.example", "TXT", "tcp") in dns_server.queries


async def test_missing_names_and_types(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("a.b.example", "A", "192.0.2.1")
    assert await resolver.txt("a.b.example") == []
    with pytest.raises(DnsNotFound) as nodata:
        await resolver.lookup("b.example", "TXT", missing_ok=False)  # empty non-terminal
    assert not nodata.value.nxdomain
    with pytest.raises(DnsNotFound) as nx:
        await resolver.lookup("c.example", "TXT", missing_ok=False)
    assert nx.value.nxdomain
    assert await resolver.txt("x" * 64 + ".example") == []  # cannot exist: no query at all


async def test_servfail_and_timeout_are_temporary(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.fail("sf.example", "servfail")
    dns_server.fail("to.example", "timeout", "TXT")
    dns_server.add("to.example", "A", "192.0.2.1")
    with pytest.raises(DnsTempError) as exc:
        await resolver.txt("sf.example")
    assert isinstance(exc.value, Unavailable)
    with pytest.raises(DnsTempError):
        resolver.sync_txt("to.example")
    assert await resolver.a("to.example") == ["192.0.2.1"]  # only TXT times out


async def test_answers_are_cached(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("cached.example", "TXT", "hello")
    assert await resolver.txt("cached.example") == ["hello"]
    assert resolver.sync_txt("cached.example") == ["hello"]  # the sync side shares the cache
    assert await resolver.txt("cached.example") == ["hello"]
    assert [q for q in dns_server.queries if q[0] == "cached.example"] == [("cached.example", "TXT", "udp")]


async def test_quoted_local_part_with_at_sign_checks_the_real_domain(example: DnsServer,
                                                                    resolver: Resolver) -> None:
    # the domain is after the last "@" (pyspf alone splits at the first): the name evaluated is
    # the one reported, and so the one DMARC aligns
    example.add("attacker.example", "TXT", "v=spf1 +all")
    got = await check_spf(resolver, "198.51.100.99", '"x@attacker.example"@example.com', "x")
    assert (got.result, got.domain) == ("fail", "example.com")
