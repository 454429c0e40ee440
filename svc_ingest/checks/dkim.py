"""DKIM verification (RFC 6376) of every signature on an inbound message, with dkimpy doing the
canonicalization and cryptography (rsa-sha256, rsa-sha1 and ed25519-sha256, RFC 8463).

The keys are fetched first, concurrently, through mailmesh's Resolver, so a DNS failure is a
temperror rather than dkimpy's silent "False"; dkimpy then verifies in a worker thread with a
dnsfunc that only hands it the fetched record. Checks dkimpy leaves to the verifier are made
here: From must be signed (RFC 6376 5.4), the key's k=, h= and s= must suit the signature
(3.6.1), t=s forbids an i= in a subdomain of d= (3.6.1), p= empty means revoked (3.6.1).

Results (RFC 8601 2.7.1):
  pass       verified
  fail       body hash or signature mismatch; expired (x=); i= violating the key's t=s
  policy     verified but not acceptable: rsa-sha1 (RFC 8301 3.1), RSA key under 1024 bits (3.2)
  neutral    the signature's syntax is broken (bad or missing tags, unknown a= or c=); and any
             non-pass result under a key in testing mode (t=y), which RFC 6376 3.6.1 says must
             be treated like unsigned mail; a t=y pass stays pass
  temperror  the key could not be fetched now (SERVFAIL, timeout)
  permerror  no key, a key that cannot be used (syntax, revoked, wrong k=/h=/s=), From unsigned
An unsigned message gives [] (the header then says dkim=none).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, replace
from typing import Any

import dkim as dkimpy
from dkim.util import DuplicateTag, InvalidTagSpec, InvalidTagValueList, parse_tag_value

from mailmesh_common.dns import DnsTempError, Resolver

log = logging.getLogger(__name__)

MIN_RSA_BITS = 1024  # RFC 8301 3.2
_KEY_ALG = {b"rsa-sha256": b"rsa", b"rsa-sha1": b"rsa", b"ed25519-sha256": b"ed25519"}
_DNS_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*$")


@dataclass(frozen=True)
class DkimResult:
    """The verdict on one DKIM-Signature (module doc lists the results and their reasons)."""

    result: str  # pass|fail|neutral|none|temperror|permerror|policy
    domain: str  # d=
    selector: str  # s=
    algorithm: str  # a=
    reason: str = ""


@dataclass
class _Pending:
    """A signature that passed the static checks and waits for its key."""

    index: int
    tags: dict[bytes, bytes]
    base: DkimResult
    key_name: str


class _Missing:
    pass


_NO_KEY = _Missing()


def _text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace").strip()


def _syntax_reason(exc: Exception) -> str:
    """dkimpy's message, without bytes reprs (b'a' → a), bounded."""
    text = re.sub(r"""b(['"])(.*?)\1""", r"\2", str(exc))
    if isinstance(exc, DuplicateTag):
        text = f"duplicate tag {text}="
    elif isinstance(exc, InvalidTagSpec):
        text = f"bad tag {text!r}"
    return text if len(text) <= 120 else text[:117] + "..."


def _static_check(index: int, header_value: bytes) -> DkimResult | _Pending:
    """Everything about one signature that needs no key."""
    try:
        tags = parse_tag_value(header_value)
    except InvalidTagValueList as exc:
        return DkimResult("neutral", "", "", "", f"signature syntax error: {_syntax_reason(exc)}")
    base = DkimResult("", _text(tags.get(b"d")).lower(), _text(tags.get(b"s")).lower(), _text(tags.get(b"a")).lower())
    try:
        dkimpy.validate_signature_fields(tags)
    except dkimpy.ValidationError as exc:
        if "x= value is past" in str(exc):
            return replace(base, result="fail", reason="signature expired")
        return replace(base, result="neutral", reason=f"signature syntax error: {_syntax_reason(exc)}")
    signed = [h.strip().lower() for h in re.split(rb"\s*:\s*", tags[b"h"])]
    if b"from" not in signed:
        return replace(base, result="permerror", reason="From header field not signed")
    key_name = f"{base.selector}._domainkey.{base.domain}"
    if not _DNS_NAME.match(key_name):
        return replace(base, result="neutral", reason="signature syntax error: bad d= or s=")
    return _Pending(index, tags, base, key_name)


async def _fetch_key(resolver: Resolver, name: str) -> bytes | _Missing | DnsTempError:
    try:
        records = await resolver.txt_bytes(name)
    except DnsTempError as exc:
        return exc
    if not records:
        return _NO_KEY
    # RFC 6376 3.6.2.2: several records at one selector are undefined; prefer one with p=
    with_p = [r for r in records if re.search(rb"(^|;)\s*p\s*=", r)]
    return (with_p or records)[0]


def _flags(value: bytes | None) -> set[bytes]:
    return {f.strip().lower() for f in (value or b"").split(b":") if f.strip()}


def _key_check(p: _Pending, record: bytes) -> tuple[DkimResult | None, dict[bytes, bytes]]:
    """The key's own checks: a result when it cannot verify this signature, plus its tags."""
    try:
        key = parse_tag_value(record)
    except InvalidTagValueList:
        return replace(p.base, result="permerror", reason="key syntax error"), {}
    if key.get(b"v", b"DKIM1") != b"DKIM1":
        return replace(p.base, result="permerror", reason="key syntax error: v= is not DKIM1"), key
    if b"p" in key and not re.sub(rb"\s+", b"", key[b"p"]):
        return replace(p.base, result="permerror", reason="key revoked"), key
    algorithm = p.tags[b"a"].lower()
    if key.get(b"k", b"rsa").strip().lower() != _KEY_ALG.get(algorithm):
        return replace(p.base, result="permerror", reason="inappropriate key algorithm"), key
    hashes = _flags(key.get(b"h"))
    if hashes and algorithm.rsplit(b"-", 1)[-1] not in hashes:
        return replace(p.base, result="permerror", reason="inappropriate hash algorithm"), key
    services = _flags(key.get(b"s"))
    if services and not services & {b"*", b"email"}:
        return replace(p.base, result="permerror", reason="key not for email (s=)"), key
    try:
        dkimpy.evaluate_pk(p.key_name.encode(), record)
    except (dkimpy.DKIMException, ValueError) as exc:
        return replace(p.base, result="permerror", reason=f"key syntax error: {_syntax_reason(exc)}"), key
    if b"s" in _flags(key.get(b"t")) and b"i" in p.tags:
        # RFC 6376 3.6.1 t=s: the i= domain must be d= itself, not a subdomain
        i_domain = p.tags[b"i"].rpartition(b"@")[2].strip().lower().rstrip(b".")
        if i_domain != p.tags[b"d"].strip().lower().rstrip(b"."):
            return replace(p.base, result="fail", reason="i= is a subdomain of d= but the key has t=s"), key
    return None, key


def _verify_one(message: Any, p: _Pending, record: bytes) -> DkimResult:
    verdict, key = _key_check(p, record)
    if verdict is None:
        def dnsfunc(_name: bytes, timeout: float = 5) -> bytes:
            return record

        try:
            ok = message.verify(idx=p.index, dnsfunc=dnsfunc)
        except dkimpy.ValidationError as exc:
            reason = "body hash mismatch" if "body hash mismatch" in str(exc) else _syntax_reason(exc)
            verdict = replace(p.base, result="fail", reason=reason)
        except dkimpy.KeyFormatError as exc:
            if "too small" in str(exc):
                verdict = replace(p.base, result="policy", reason=f"RSA key under {MIN_RSA_BITS} bits (RFC 8301)")
            else:
                verdict = replace(p.base, result="permerror", reason=f"key error: {_syntax_reason(exc)}")
        except dkimpy.DKIMException as exc:
            verdict = replace(p.base, result="neutral", reason=_syntax_reason(exc))
        except Exception:  # whatever dkimpy trips over in a hostile message: that signature is out
            log.warning("DKIM verification error for d=%s s=%s", p.base.domain, p.base.selector, exc_info=True)
            verdict = replace(p.base, result="neutral", reason="signature could not be processed")
        else:
            if not ok:
                verdict = replace(p.base, result="fail", reason="signature did not verify")
            elif p.tags[b"a"].lower() == b"rsa-sha1":
                verdict = replace(p.base, result="policy", reason="rsa-sha1 not allowed (RFC 8301)")
            else:
                verdict = replace(p.base, result="pass")
    if b"y" in _flags(key.get(b"t")):
        if verdict.result == "pass":
            return replace(verdict, reason="key in testing mode (t=y)")
        return replace(verdict, result="neutral", reason=f"key in testing mode (t=y): {verdict.reason}")
    return verdict


_SIGNATURE_FIELD = re.compile(rb"(?im)^dkim-signature\s*:")


def _head(raw: bytes) -> bytes:
    """The header section (up to the first empty line, CRLF or bare LF)."""
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]


def _verify_all(raw: bytes, pending: list[_Pending], keys: list[bytes]) -> list[DkimResult]:
    message = dkimpy.DKIM(raw, minkey=MIN_RSA_BITS)
    return [_verify_one(message, p, key) for p, key in zip(pending, keys, strict=True)]


async def verify_dkim(resolver: Resolver, raw: bytes, *, max_signatures: int = 5) -> list[DkimResult]:
    """One result per DKIM-Signature, top first, for at most `max_signatures` of them."""
    if _SIGNATURE_FIELD.search(_head(raw)) is None:
        return []  # unsigned (most mail): no need to take the message apart
    try:
        headers, _body = dkimpy.rfc822_parse(raw)
    except dkimpy.MessageFormatError:
        if _SIGNATURE_FIELD.search(_head(raw)):
            return [DkimResult("permerror", "", "", "", "message header could not be parsed")]
        return []
    values = [value for name, value in headers if name.lower() == b"dkim-signature"][:max_signatures]
    results: list[DkimResult | _Pending] = []
    for i, value in enumerate(values):
        try:
            results.append(_static_check(i, value))
        except Exception:  # a signature dkimpy's validation trips over: broken syntax
            log.info("unparseable DKIM-Signature", exc_info=True)
            results.append(DkimResult("neutral", "", "", "", "signature syntax error"))
    pending = [r for r in results if isinstance(r, _Pending)]
    if pending:
        names = sorted({p.key_name for p in pending})
        fetched = dict(zip(names, await asyncio.gather(*(_fetch_key(resolver, n) for n in names)),
                           strict=True))
        ready: list[_Pending] = []
        keys: list[bytes] = []
        for p in pending:
            key = fetched[p.key_name]
            if isinstance(key, DnsTempError):
                results[p.index] = replace(p.base, result="temperror", reason="key lookup failed")
            elif isinstance(key, _Missing):
                results[p.index] = replace(p.base, result="permerror", reason="no key for signature")
            else:
                ready.append(p)
                keys.append(key)
        if ready:
            try:
                verified = await asyncio.to_thread(_verify_all, raw, ready, keys)
            except Exception as exc:  # dkimpy could not take the message apart at all
                log.info("DKIM verification could not parse the message: %s", exc)
                verified = [replace(p.base, result="permerror", reason="message could not be parsed") for p in ready]
            for p, verdict in zip(ready, verified, strict=True):
                results[p.index] = verdict
    return [r for r in results if isinstance(r, DkimResult)]


__all__ = ["DkimResult", "verify_dkim"]
