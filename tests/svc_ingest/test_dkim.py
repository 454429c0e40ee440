"""DKIM verification against keys published in a real DNS server, with messages signed by
dkimpy using keys made here (RSA 2048, ed25519)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass

import dkim
import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailmesh_common.dns import Resolver
from svc_ingest.checks.dkim import DkimResult, verify_dkim
from tests import dnsserver
from tests.dnsserver import DnsServer

dns_server = dnsserver.dns_server  # the fixture, requested by name below

MESSAGE = (b"From: Alice <alice@example.com>\r\n"
           b"To: bob@example.net\r\n"
           b"Subject: quarterly numbers\r\n"
           b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <q3@example.com>\r\n"
           b"\r\n"
           b"Hello Bob,\r\nthe numbers are attached.\r\n")
HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]


@dataclass(frozen=True)
class Key:
    private: bytes  # what dkim.sign takes
    public: str  # the p= value
    k: str  # the k= value


def rsa_key(bits: int = 2048) -> Key:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(pem, base64.b64encode(der).decode(), "rsa")


def ed25519_key() -> Key:
    sk = nacl.signing.SigningKey.generate()
    return Key(base64.b64encode(bytes(sk)), base64.b64encode(bytes(sk.verify_key)).decode(), "ed25519")


@pytest.fixture(scope="module")
def rsa2048() -> Key:
    return rsa_key(2048)


@pytest.fixture(scope="module")
def ed() -> Key:
    return ed25519_key()


@pytest.fixture
def resolver(dns_server: DnsServer) -> Iterator[Resolver]:
    yield Resolver([dns_server.address], timeout_s=1.0, lifetime_s=2.0)


def publish(server: DnsServer, selector: str, domain: str, key: Key, extra: str = "") -> None:
    server.add(f"{selector}._domainkey.{domain}", "TXT", f"v=DKIM1; k={key.k};{extra} p={key.public}")


def sign(message: bytes, selector: str, domain: str, key: Key, *, algorithm: bytes | None = None,
         identity: bytes | None = None) -> bytes:
    alg = algorithm or (b"ed25519-sha256" if key.k == "ed25519" else b"rsa-sha256")
    header = dkim.sign(message, selector.encode(), domain.encode(), key.private, signature_algorithm=alg,
                       identity=identity, include_headers=HEADERS)
    return header + message


async def test_valid_rsa_sha256_signature_passes(dns_server: DnsServer, resolver: Resolver,
                                                 rsa2048: Key) -> None:
    publish(dns_server, "s1", "example.com", rsa2048)
    results = await verify_dkim(resolver, sign(MESSAGE, "s1", "example.com", rsa2048))
    assert results == [DkimResult("pass", "example.com", "s1", "rsa-sha256", "")]


async def test_ed25519_signature_passes(dns_server: DnsServer, resolver: Resolver, ed: Key) -> None:
    publish(dns_server, "ed", "example.com", ed)
    results = await verify_dkim(resolver, sign(MESSAGE, "ed", "example.com", ed))
    assert results == [DkimResult("pass", "example.com", "ed", "ed25519-sha256", "")]


async def test_tampered_body_fails_with_body_hash_mismatch(dns_server: DnsServer, resolver: Resolver,
                                                           rsa2048: Key) -> None:
    publish(dns_server, "s1", "example.com", rsa2048)
    signed = sign(MESSAGE, "s1", "example.com", rsa2048).replace(b"attached", b"ATTACHED")
    [result] = await verify_dkim(resolver, signed)
    assert (result.result, result.reason) == ("fail", "body hash mismatch")


async def test_tampered_signed_header_fails(dns_server: DnsServer, resolver: Resolver, ed: Key) -> None:
    publish(dns_server, "ed", "example.com", ed)
    signed = sign(MESSAGE, "ed", "example.com", ed).replace(b"quarterly numbers", b"wire the money")
    [result] = await verify_dkim(resolver, signed)
    assert (result.result, result.reason) == ("fail", "signature did not verify")


async def test_rsa_sha1_never_passes_even_when_valid(dns_server: DnsServer, resolver: Resolver,
                                                     rsa2048: Key) -> None:
    publish(dns_server, "s1", "example.com", rsa2048)
    [result] = await verify_dkim(resolver, sign(MESSAGE, "s1", "example.com", rsa2048, algorithm=b"rsa-sha1"))
    assert result == DkimResult("policy", "example.com", "s1", "rsa-sha1", "rsa-sha1 not allowed (RFC 8301)")


async def test_key_with_t_s_rejects_an_i_in_a_subdomain(dns_server: DnsServer, resolver: Resolver,
                                                        rsa2048: Key) -> None:
    publish(dns_server, "s1", "example.com", rsa2048, " t=s;")
    signed = sign(MESSAGE, "s1", "example.com", rsa2048, identity=b"alice@mail.example.com")
    [result] = await verify_dkim(resolver, signed)
    assert result.result == "fail"
    assert "t=s" in result.reason


async def test_key_with_t_s_accepts_i_equal_to_d(dns_server: DnsServer, resolver: Resolver,
                                                 rsa2048: Key) -> None:
    publish(dns_server, "s1", "example.com", rsa2048, " t=s;")
    signed = sign(MESSAGE, "s1", "example.com", rsa2048, identity=b"alice@example.com")
    [result] = await verify_dkim(resolver, signed)
    assert result.result == "pass"


async def test_without_t_s_an_i_in_a_subdomain_is_fine(dns_server: DnsServer, resolver: Resolver,
                                                       rsa2048: Key) -> None:
    publish(dns_server, "s1", "example.com", rsa2048)
    signed = sign(MESSAGE, "s1", "example.com", rsa2048, identity=b"alice@mail.example.com")
    assert [r.result for r in await verify_dkim(resolver, signed)] == ["pass"]


async def test_testing_mode_key_turns_a_failure_into_neutral(dns_server: DnsServer, resolver: Resolver,
                                                             ed: Key) -> None:
    publish(dns_server, "ed", "example.com", ed, " t=y;")
    signed = sign(MESSAGE, "ed", "example.com", ed)
    [ok] = await verify_dkim(resolver, signed)
    assert (ok.result, ok.reason) == ("pass", "key in testing mode (t=y)")
    [bad] = await verify_dkim(resolver, signed.replace(b"Hello", b"Hallo"))
    assert bad.result == "neutral"
    assert bad.reason.startswith("key in testing mode (t=y)")


async def test_unsigned_message_gives_no_results(resolver: Resolver) -> None:
    assert await verify_dkim(resolver, MESSAGE) == []


async def test_missing_key_is_permerror(resolver: Resolver, ed: Key) -> None:
    [result] = await verify_dkim(resolver, sign(MESSAGE, "gone", "example.com", ed))
    assert (result.result, result.reason) == ("permerror", "no key for signature")


async def test_revoked_key_is_permerror(dns_server: DnsServer, resolver: Resolver, ed: Key) -> None:
    dns_server.add("ed._domainkey.example.com", "TXT", "v=DKIM1; k=ed25519; p=")
    [result] = await verify_dkim(resolver, sign(MESSAGE, "ed", "example.com", ed))
    assert (result.result, result.reason) == ("permerror", "key revoked")


async def test_key_lookup_servfail_is_temperror(dns_server: DnsServer, resolver: Resolver, ed: Key) -> None:
    dns_server.fail("ed._domainkey.example.com", "servfail")
    [result] = await verify_dkim(resolver, sign(MESSAGE, "ed", "example.com", ed))
    assert result.result == "temperror"


async def test_key_of_the_wrong_type_is_permerror(dns_server: DnsServer, resolver: Resolver,
                                                  ed: Key, rsa2048: Key) -> None:
    publish(dns_server, "s1", "example.com", ed)  # an ed25519 key where the signature is RSA
    [result] = await verify_dkim(resolver, sign(MESSAGE, "s1", "example.com", rsa2048))
    assert (result.result, result.reason) == ("permerror", "inappropriate key algorithm")


async def test_key_restricted_to_other_hashes_is_permerror(dns_server: DnsServer, resolver: Resolver,
                                                           rsa2048: Key) -> None:
    publish(dns_server, "s1", "example.com", rsa2048, " h=sha1;")
    [result] = await verify_dkim(resolver, sign(MESSAGE, "s1", "example.com", rsa2048))
    assert (result.result, result.reason) == ("permerror", "inappropriate hash algorithm")


async def test_signature_not_covering_from_is_permerror(dns_server: DnsServer, resolver: Resolver,
                                                        ed: Key) -> None:
    publish(dns_server, "ed", "example.com", ed)
    signed = sign(MESSAGE, "ed", "example.com", ed).replace(b"h=from : to", b"h=to", 1)
    [result] = await verify_dkim(resolver, signed)
    assert (result.result, result.reason) == ("permerror", "From header field not signed")


async def test_broken_signature_syntax_is_neutral(resolver: Resolver) -> None:
    broken = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; this is not a tag list\r\n" + MESSAGE
    [result] = await verify_dkim(resolver, broken)
    assert result.result == "neutral"
    unknown = b"DKIM-Signature: v=1; a=rsa-md5; d=example.com; s=x; h=from; bh=AAAA; b=AAAA\r\n" + MESSAGE
    [result] = await verify_dkim(resolver, unknown)
    assert (result.result, result.domain, result.algorithm) == ("neutral", "example.com", "rsa-md5")


async def test_every_signature_gets_a_result_in_order(dns_server: DnsServer, resolver: Resolver,
                                                      rsa2048: Key, ed: Key) -> None:
    publish(dns_server, "s1", "example.com", rsa2048)
    publish(dns_server, "ed", "lists.example.org", ed)
    once = sign(MESSAGE, "s1", "example.com", rsa2048)
    twice = sign(once, "ed", "lists.example.org", ed)  # e.g. a mailing list re-signing
    results = await verify_dkim(resolver, twice)
    assert [(r.result, r.domain, r.algorithm) for r in results] == [
        ("pass", "lists.example.org", "ed25519-sha256"), ("pass", "example.com", "rsa-sha256")]
    unsigned_key = sign(twice, "nokey", "example.net", ed)
    assert [r.result for r in await verify_dkim(resolver, unsigned_key)] == ["permerror", "pass", "pass"]
    assert len(await verify_dkim(resolver, unsigned_key, max_signatures=2)) == 2


async def test_long_key_record_split_over_strings_is_joined(dns_server: DnsServer,
                                                            resolver: Resolver) -> None:
    rsa4096 = rsa_key(4096)  # its p= (about 740 characters) needs three 255-byte TXT strings
    publish(dns_server, "big", "example.com", rsa4096)
    [result] = await verify_dkim(resolver, sign(MESSAGE, "big", "example.com", rsa4096))
    assert result.result == "pass"
