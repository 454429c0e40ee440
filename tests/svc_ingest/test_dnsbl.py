"""DNS blocklists of SMTP clients (RFC 5782) through the configured resolver and a real DNS server
on loopback: listed clients get 554 5.7.1 at RCPT (postmaster@ and abuse@ still reachable); a
"query refused" answer, no answer or a failing list blocks nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailmesh_common.dns import Resolver
from svc_ingest.checks.dnsbl import is_listing, listing_zone, query_name
from tests.dnsserver import DnsServer, dns_server  # noqa: F401  (fixture)
from tests.svc_ingest.conftest import Nats, in_thread, message, start_ingest_mesh, stop_ingest_mesh
from tests.svc_ingest.test_smtp import dialog, send

LOOPBACK_V4 = "1.0.0.127"


def test_query_names_follow_rfc_5782() -> None:
    # RFC 5782 2.1 and 2.4 examples
    assert query_name("192.0.2.99", "bad.example.com") == "99.2.0.192.bad.example.com"
    assert query_name("2001:db8:1:2:3:4:567:89ab", "ugly.example.com.") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com")
    assert query_name("::ffff:192.0.2.99", "bl.test") == "99.2.0.192.bl.test"
    assert query_name("not an address", "bl.test") is None


@pytest.mark.parametrize(("answer", "listed"), [
    ("127.0.0.2", True), ("127.0.0.10", True), ("127.0.1.2", True),
    ("127.255.255.254", False), ("127.255.255.252", False), ("192.0.2.1", False), ("x", False)])
def test_only_answers_in_127_8_outside_the_error_range_are_listings(answer: str, listed: bool) -> None:
    assert is_listing(answer) is listed


async def test_listing_zone_asks_every_zone_and_fails_open(dns_server: DnsServer) -> None:  # noqa: F811
    resolver = Resolver((dns_server.address,), timeout_s=1.0, lifetime_s=2.0)  # answers come in time on a busy machine
    dns_server.add("2.0.0.127.second.test", "A", "127.0.0.4")
    dns_server.add("3.0.0.127.first.test", "A", "127.255.255.254")  # "query refused": not a listing
    dns_server.fail("3.0.0.127.second.test", "servfail")
    dns_server.fail("4.0.0.127.first.test", "timeout")
    zones = ("first.test", "second.test")
    assert await listing_zone(resolver, "127.0.0.2", zones) == "second.test"
    assert await listing_zone(resolver, "127.0.0.3", zones) == ""
    assert await listing_zone(resolver, "127.0.0.4", zones) == ""  # a list timing out blocks nothing
    assert await listing_zone(resolver, "127.0.0.5", zones) == ""  # NXDOMAIN: not listed
    assert await listing_zone(resolver, "127.0.0.2", ()) == ""
    names = {q[0] for q in dns_server.queries}
    assert {"2.0.0.127.first.test", "2.0.0.127.second.test"} <= names


async def test_a_listed_client_is_refused_but_can_reach_postmaster(tmp_path: Path, nats: Nats,
                                                                    dns_server: DnsServer) -> None:  # noqa: F811
    dns_server.add(f"{LOOPBACK_V4}.bl.test", "A", "127.0.0.2")
    m = await start_ingest_mesh(tmp_path, nats, dns_server, dnsbl_zones="clean.test,bl.test",
                                postmaster="carol@example.com")
    try:
        replies = await in_thread(dialog, m, "MAIL FROM:<s@remote.test>", "RCPT TO:<alice@example.com>",
                                  "RCPT TO:<postmaster@example.com>", "RCPT TO:<Abuse@example.com>")
        assert replies[1] == (554, b"5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test")
        assert replies[2:] == [(250, b"2.1.5 Recipient OK")] * 2
        assert await in_thread(send, m, message("why am I listed", to="postmaster@example.com"),
                               ["alice@example.com", "postmaster@example.com"]) == {
            "alice@example.com": (554, b"5.7.1 Service unavailable; client [127.0.0.1] blocked using bl.test")}
        await m.wait_subject("carol", "why am I listed")

        # delisted: the resolver's cache ends with the answer's TTL; a fresh mesh asks again
        dns_server.remove(f"{LOOPBACK_V4}.bl.test")
        dns_server.add(f"{LOOPBACK_V4}.bl.test", "A", "127.255.255.254")  # the list now refuses to say
    finally:
        await stop_ingest_mesh(m)
    m = await start_ingest_mesh(tmp_path / "again", nats, dns_server, dnsbl_zones="bl.test")
    try:
        assert await in_thread(send, m, message("after delisting"), ["alice@example.com"]) == {}
        await m.wait_subject("alice", "after delisting")
    finally:
        await stop_ingest_mesh(m)
