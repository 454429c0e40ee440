"""Forward-confirmed reverse DNS of the SMTP client in the `Received` header (RFC 5321 4.4:
`from helo (name [ip])`), through the configured resolver against the loopback DNS server:
a confirmed PTR name is shown, an unconfirmed one is not, and a DNS server that does not
answer delays nothing beyond the short bound and never costs the message."""

from __future__ import annotations

import asyncio

import dns.reversename

from mailmesh_common.dns import Resolver
from svc_ingest.checks.rdns import verified_name
from tests.dnsserver import DnsServer
from tests.svc_ingest.conftest import IngestMesh, in_thread, message

LOOPBACK_PTR = "1.0.0.127.in-addr.arpa"
V6_PTR = dns.reversename.from_address("2001:db8::1").to_text(omit_final_dot=True)


def send(m: IngestMesh, raw: bytes) -> dict[str, tuple[int, bytes]]:
    with m.smtp() as s:
        return s.sendmail("sender@remote.test", ["alice@example.com"], raw)


async def received_line(m: IngestMesh, subject: str) -> bytes:
    got = await m.wait_subject("alice", subject)
    head = (await m.raw("alice", got.id)).split(b"\r\n\r\n")[0]
    return next(ln for ln in head.split(b"\r\n") if ln.startswith(b"Received:"))


async def test_confirmed_ptr_name_is_in_the_received_header(ingest_mesh: IngestMesh) -> None:
    m = ingest_mesh
    m.dns.add(LOOPBACK_PTR, "PTR", "mx1.sender-host.test")
    m.dns.add("mx1.sender-host.test", "A", "127.0.0.1")
    assert await in_thread(send, m, message("rdns confirmed")) == {}
    line = await received_line(m, "rdns confirmed")
    assert line.startswith(b"Received: from client.remote.test (mx1.sender-host.test [127.0.0.1])"), line


async def test_ptr_name_that_does_not_resolve_back_is_not_shown(ingest_mesh: IngestMesh) -> None:
    m = ingest_mesh
    m.dns.add(LOOPBACK_PTR, "PTR", "www.bank.test")  # the address owner's claim...
    m.dns.add("www.bank.test", "A", "192.0.2.10")  # ...which the name's owner does not confirm
    assert await in_thread(send, m, message("rdns forged")) == {}
    line = await received_line(m, "rdns forged")
    assert line.startswith(b"Received: from client.remote.test ([127.0.0.1])"), line
    assert b"bank" not in line


async def test_dns_not_answering_ptr_still_accepts_within_the_bound(ingest_mesh: IngestMesh) -> None:
    m = ingest_mesh
    m.ingest.pipeline.rdns_timeout_s = 0.5
    m.dns.fail(LOOPBACK_PTR, "timeout")
    assert await in_thread(send, m, message("rdns timeout")) == {}
    line = await received_line(m, "rdns timeout")
    assert line.startswith(b"Received: from client.remote.test ([127.0.0.1])"), line
    assert any(q[0] == LOOPBACK_PTR and q[1] == "PTR" for q in m.dns.queries), "the lookup went to our DNS"


async def test_verified_name_checks_aaaa_for_ipv6_and_maps_v4_in_v6(dns_server: DnsServer) -> None:
    dns_server.add(V6_PTR, "PTR", "v6.sender-host.test")
    dns_server.add("v6.sender-host.test", "AAAA", "2001:db8::1")
    dns_server.add("4.3.2.192.in-addr.arpa", "PTR", "other.test")
    dns_server.add("4.3.2.192.in-addr.arpa", "PTR", "v4.sender-host.test")
    dns_server.add("other.test", "A", "198.51.100.1")
    dns_server.add("v4.sender-host.test", "A", "192.2.3.4")
    resolver = Resolver([dns_server.address])
    assert await verified_name(resolver, "2001:db8::1") == "v6.sender-host.test"
    # a dual-stack listener reports an IPv4 client as ::ffff:a.b.c.d; the second PTR is the confirmed one
    assert await verified_name(resolver, "::ffff:192.2.3.4") == "v4.sender-host.test"
    assert await verified_name(resolver, "2001:db8::2") == ""  # no PTR at all
    assert await verified_name(resolver, "not an address") == ""


async def test_servfail_and_timeout_give_no_name_quickly(dns_server: DnsServer) -> None:
    dns_server.fail("4.3.2.192.in-addr.arpa", "servfail")
    dns_server.fail("5.3.2.192.in-addr.arpa", "timeout")
    resolver = Resolver([dns_server.address])
    assert await verified_name(resolver, "192.2.3.4") == ""
    assert await asyncio.wait_for(verified_name(resolver, "192.2.3.5", timeout_s=0.3), 30) == ""
