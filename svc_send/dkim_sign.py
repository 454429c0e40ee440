"""DKIM signing (RFC 6376) of outgoing mail with dkimpy: rsa-sha256 with the domain's RSA key,
and ed25519-sha256 (RFC 8463) as well when the domain has an Ed25519 key. Canonicalization is
relaxed/relaxed, which survives the header refolding and whitespace changes of relays.

Each signature covers the message without the other; both are prepended, Ed25519 on top.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import dkim as dkimpy
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from svc_send.dkim_keys import DkimKey, DkimKeyStore

log = logging.getLogger(__name__)

# RFC 6376 5.4.1: the fields most worth signing (dkimpy adds From and oversigns the key ones)
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id", b"in-reply-to", b"references",
                  b"reply-to", b"mime-version", b"content-type", b"content-transfer-encoding")


_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}
_PURE_PYTHON_RSA_SIGN = dkimpy.RSASSA_PKCS1_v1_5_sign


@functools.lru_cache(maxsize=64)
def _openssl_key(n: int, e: int, d: int, p: int, q: int, dmp1: int, dmq1: int, iqmp: int) -> rsa.RSAPrivateKey:
    numbers = rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, rsa.RSAPublicNumbers(e, n))
    return numbers.private_key(unsafe_skip_rsa_key_validation=True)


def _rsa_sign(digest: Any, pk: dict[str, int]) -> bytes:
    """dkimpy's RSASSA-PKCS1-v1_5 signing (RFC 8017 8.2.1) done by OpenSSL: about 20 times faster
    than its pure-Python big-integer arithmetic, and byte-identical (PKCS#1 v1.5 signatures are
    deterministic)."""
    algorithm = _HASHES.get(str(getattr(digest, "name", "")).lower())
    if algorithm is None:
        return bytes(_PURE_PYTHON_RSA_SIGN(digest, pk))
    key = _openssl_key(pk["modulus"], pk["publicExponent"], pk["privateExponent"], pk["prime1"], pk["prime2"],
                       pk["exponent1"], pk["exponent2"], pk["coefficient"])
    return key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))


dkimpy.RSASSA_PKCS1_v1_5_sign = _rsa_sign  # the name dkim.DKIM.sign calls

# dkimpy parses the PEM (pure-Python ASN.1) on every signature; our keys change rarely, and the
# parsed form (a dict of integers) is only read, so one parse per key is enough
_parse_pem_private_key = functools.lru_cache(maxsize=64)(dkimpy.parse_pem_private_key)
dkimpy.parse_pem_private_key = _parse_pem_private_key  # the name dkim.DKIM.sign calls


def sign_with(raw: bytes, keys: list[DkimKey]) -> bytes:
    """raw with one DKIM-Signature per key prepended (CRLF line ends expected)."""
    signatures: list[bytes] = []
    present = {line.split(b":", 1)[0].strip().lower()
               for line in raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n") if b":" in line and not line[:1].isspace()}
    headers = [h for h in SIGNED_HEADERS if h in present or h == b"from"]
    for key in keys:
        sig = dkimpy.sign(raw, key.selector.encode(), key.domain.encode(), key.dkimpy_private_key(),
                          canonicalize=(b"relaxed", b"relaxed"), signature_algorithm=key.signature_algorithm,
                          include_headers=headers, linesep=b"\r\n")
        signatures.insert(0, sig if sig.endswith(b"\r\n") else sig + b"\r\n")
    return b"".join(signatures) + raw


class Signer:
    """Signs with the keys of the From domain found in the key store; unsigned when it has none."""

    def __init__(self, keys: DkimKeyStore) -> None:
        self.keys = keys

    async def sign(self, raw: bytes, domain: str) -> tuple[bytes, list[str]]:
        """(signed raw, ["rsa-sha256", ...] signatures made)."""
        keys = await self.keys.signing_keys(domain)
        if not keys:
            log.debug("no DKIM key for %s: sending unsigned", domain)
            return raw, []
        signed = await asyncio.to_thread(sign_with, raw, keys)
        return signed, [k.signature_algorithm.decode() for k in keys]


__all__ = ["Signer", "sign_with"]
