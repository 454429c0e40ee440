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
    yield Resolver([dns_server.address], timeout_s=1.0, lifetime_s=2.0)


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


# --- verdicts kept no longer than the answers they rest on ------------------------------------

def _asked(dns_server: DnsServer, name: str) -> int:
    return sum(1 for q in dns_server.queries if q[0] == name)


async def test_a_repeated_check_is_answered_without_the_dns(example: DnsServer, resolver: Resolver) -> None:
    first = await check_spf(resolver, "203.0.113.5", "a@example.com", "x")
    asked = len(example.queries)
    again = await check_spf(resolver, "203.0.113.5", "a@example.com", "x")
    assert again == first and first.result == "pass"
    assert len(example.queries) == asked
    # another client, sender or HELO is evaluated on its own
    assert (await check_spf(resolver, "198.51.100.99", "a@example.com", "x")).result == "fail"
    assert (await check_spf(resolver, "203.0.113.5", "b@example.com", "x")).result == "pass"


async def test_a_changed_record_is_seen_once_its_ttl_ran_out(dns_server: DnsServer, resolver: Resolver) -> None:
    # the verdict rests on two records; the included one may not be kept at all (TTL 0)
    dns_server.add("short.example", "TXT", "v=spf1 include:_inc.short.example -all", ttl=3600)
    dns_server.add("_inc.short.example", "TXT", "v=spf1 ip4:192.0.2.1 -all", ttl=0)
    assert (await check_spf(resolver, "192.0.2.1", "a@short.example", "x")).result == "pass"
    dns_server.remove("_inc.short.example")
    dns_server.add("_inc.short.example", "TXT", "v=spf1 ip4:192.0.2.2 -all", ttl=0)
    assert (await check_spf(resolver, "192.0.2.1", "a@short.example", "x")).result == "fail"
    assert _asked(dns_server, "_inc.short.example") == 2
    assert _asked(dns_server, "short.example") == 1  # its own answer still came from the cache


async def test_a_verdict_with_the_domains_explanation_is_evaluated_each_time(
        dns_server: DnsServer, resolver: Resolver) -> None:
    # RFC 7208 7.3: %{t} in exp= text is the time of the check, never one remembered
    dns_server.add("when.example", "TXT", "v=spf1 ~all exp=why.when.example")
    dns_server.add("why.when.example", "TXT", "checked at %{t}")
    first = await check_spf(resolver, "192.0.2.1", "a@when.example", "x")
    time.sleep(1.1)
    second = await check_spf(resolver, "192.0.2.1", "a@when.example", "x")
    assert first.result == second.result == "softfail"
    assert first.explanation != second.explanation
    assert int(second.explanation.rpartition(" ")[2]) <= int(time.time())


async def test_temporary_failures_are_not_remembered(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.fail("flaky.example", "servfail")
    assert (await check_spf(resolver, "192.0.2.1", "a@flaky.example", "x")).result == "temperror"
    dns_server.clear()
    dns_server.add("flaky.example", "TXT", "v=spf1 ip4:192.0.2.1 -all")
    assert (await check_spf(resolver, "192.0.2.1", "a@flaky.example", "x")).result == "pass"


async def test_without_a_dns_cache_every_check_asks_the_dns(dns_server: DnsServer) -> None:
    uncached = Resolver([dns_server.address], timeout_s=1.0, lifetime_s=2.0, cache_entries=0)
    dns_server.add("nocache.example", "TXT", "v=spf1 ip4:192.0.2.1 -all")
    for _ in range(2):
        assert (await check_spf(uncached, "192.0.2.1", "a@nocache.example", "x")).result == "pass"
    assert _asked(dns_server, "nocache.example") == 2


async def test_answers_say_until_when_they_stand(dns_server: DnsServer, resolver: Resolver) -> None:
    dns_server.add("ttl.example", "TXT", "hello", ttl=120)
    before = time.time()
    records, until = resolver.sync_lookup_valid_until("ttl.example", "TXT")
    assert [b"".join(r.strings) for r in records] == [b"hello"]
    assert before + 119 <= until <= time.time() + 120
    assert resolver.sync_lookup_valid_until("ttl.example", "TXT")[1] == until  # cached: the same end
    missing, until_missing = resolver.sync_lookup_valid_until("nx.ttl.example", "TXT")
    assert missing == [] and until_missing > before  # the negative answer is cached too
    assert resolver.sync_lookup_valid_until("x" * 64 + ".example", "TXT") == ([], float("inf"))


async def test_cached_missing_answers_keep_nxdomain_and_nodata_apart(dns_server: DnsServer,
                                                                    resolver: Resolver) -> None:
    dns_server.add("a.b.example", "A", "192.0.2.1")
    dns_server.add("a.b.example", "TXT", "there")
    for _ in range(2):  # the second round comes from the cache
        with pytest.raises(DnsNotFound) as nodata:
            await resolver.lookup("b.example", "TXT", missing_ok=False)
        assert not nodata.value.nxdomain
        with pytest.raises(DnsNotFound) as nx:
            await resolver.lookup("c.b.example", "A", missing_ok=False)
        assert nx.value.nxdomain
        assert await resolver.txt("a.b.example") == ["there"]
        assert await resolver.a("c.b.example") == []
    assert len(dns_server.queries) == 3
