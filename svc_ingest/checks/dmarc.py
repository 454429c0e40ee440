"""DMARC (RFC 7489): policy discovery for the RFC5322.From domain, identifier alignment of the
SPF and DKIM results, and the disposition the receiver applies.

- Discovery (6.6.3): TXT at _dmarc.<From domain>; records not starting with v=DMARC1 are
  dropped; none left → the same at _dmarc.<organizational domain>; several left → no DMARC
  (result none). A record without a valid p= (or with an invalid sp=) counts as p=none when its
  rua= holds a valid URI, and as no record otherwise (step 6). Other bad values fall back to
  their defaults (6.3). A transient DNS failure is temperror.
- Policy: p= for the From domain itself, sp= (else p=) when the record came from the
  organizational domain of a subdomain (6.3). pct= (6.6.4): when a message is not sampled, the
  next lower policy applies (reject → quarantine → none). Sampling is random unless the caller
  passes `sample_key` (the ingest id, say): then sha256(sample_key) mod 100 < pct decides, so a
  retried message meets the same fate.
- Alignment (3.1): relaxed (organizational domains equal, see psl.py) unless adkim=s / aspf=s
  (domains equal). SPF counts with the identity it checked: MAIL FROM, or HELO when MAIL FROM
  was null (RFC 7208 2.4), as 4.1 says.
- Result: pass when SPF or any DKIM signature passes aligned; else temperror when an aligned
  identifier could not be checked for a transient reason (a retry may pass: a 4xx, never a
  reject, is the right answer then); else fail. The disposition is the policy for fail, none
  otherwise. permerror: the From domain is not a domain name at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from dataclasses import dataclass

import idna

from mailmesh_common.dns import DnsTempError, Resolver
from svc_ingest.checks.dkim import DkimResult
from svc_ingest.checks.psl import organizational_domain
from svc_ingest.checks.spf import SpfResult

POLICIES = ("none", "quarantine", "reject")
_LOWER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_VERSION = re.compile(r"^v\s*=\s*DMARC1\s*(;|$)")  # RFC 7489 6.4: "DMARC1" is case-sensitive
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s!]+(![0-9]+[kmgt]?)?$", re.IGNORECASE)
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class DmarcResult:
    """The DMARC verdict for one message."""

    result: str  # pass|fail|none|temperror|permerror
    domain: str  # the RFC5322.From domain
    policy: str  # none|quarantine|reject: the policy for this message, after sp= and pct=
    disposition: str  # none|quarantine|reject: what to do with it (policy on fail, else none)


@dataclass(frozen=True)
class DmarcRecord:
    """A parsed policy record; p / sp are None when absent or invalid."""

    p: str | None
    sp: str | None = None
    sp_invalid: bool = False
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    rua_valid: bool = False

    @property
    def usable(self) -> bool:
        """RFC 7489 6.6.3 step 6: a valid p= (and sp=, when present), or a valid rua=."""
        return (self.p is not None and not self.sp_invalid) or self.rua_valid


def is_dmarc_record(text: str) -> bool:
    return bool(_VERSION.match(text.strip()))


def parse_record(text: str) -> DmarcRecord | None:
    """The record's tags (RFC 7489 6.3), or None when it is not a DMARC record at all."""
    if not is_dmarc_record(text):
        return None
    tags: dict[str, str] = {}
    for part in text.strip().split(";")[1:]:
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if eq and name and name not in tags:
            tags[name] = value.strip()
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower() if "sp" in tags else None
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() and int(pct_text) <= 100 else 100
    rua = [u.strip() for u in tags.get("rua", "").split(",") if u.strip()]
    return DmarcRecord(
        p=p if p in POLICIES else None,
        sp=sp if sp in POLICIES else None,
        sp_invalid=sp is not None and sp not in POLICIES,
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
        pct=pct,
        rua_valid=any(_URI.match(u) for u in rua),
    )


def normalize_domain(domain: str) -> str | None:
    """Lowercase A-label form without the final dot, or None when it is no domain name."""
    name = domain.strip().rstrip(".").lower()
    if not name or len(name) > 253:
        return None
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError:
            return None
    if not all(_LABEL.match(label) for label in name.split(".")):
        return None
    return name


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment (RFC 7489 3.1): strict = same domain, relaxed = same organization."""
    ident = normalize_domain(identifier)
    if ident is None:
        return False
    if mode == "s":
        return ident == from_domain
    return organizational_domain(ident) == organizational_domain(from_domain)


async def _records_at(resolver: Resolver, domain: str) -> list[str]:
    return [t for t in await resolver.txt(f"_dmarc.{domain}") if is_dmarc_record(t)]


async def discover(resolver: Resolver, from_domain: str) -> tuple[DmarcRecord, bool] | None:
    """The policy record for `from_domain` and whether it came from the organizational domain
    (RFC 7489 6.6.3); None when DMARC does not apply. DnsTempError passes through."""
    records = await _records_at(resolver, from_domain)
    from_org = False
    if not records:
        org = organizational_domain(from_domain)
        if org != from_domain:
            records = await _records_at(resolver, org)
            from_org = True
    if len(records) != 1:
        return None
    record = parse_record(records[0])
    if record is None or not record.usable:
        return None
    return record, from_org


def _sampled(pct: int, sample_key: str | None) -> bool:
    if pct >= 100:
        return True
    if pct <= 0:
        return False
    if sample_key is None:
        return secrets.randbelow(100) < pct
    return int.from_bytes(hashlib.sha256(sample_key.encode()).digest()[:8], "big") % 100 < pct


Discovery = asyncio.Future[tuple[DmarcRecord, bool] | None]


def prefetch(resolver: Resolver, from_domain: str) -> Discovery | None:
    """Starts looking up `from_domain`'s policy now, so the lookup runs while SPF and DKIM do
    theirs (with the resolver unreachable, one wait instead of two in a row); hand the task
    to check_dmarc. None when the domain is not one."""
    domain = normalize_domain(from_domain)
    return asyncio.ensure_future(discover(resolver, domain)) if domain is not None else None


async def check_dmarc(resolver: Resolver, from_domain: str, spf: SpfResult, dkim: list[DkimResult],
                      *, sample_key: str | None = None, discovery: Discovery | None = None) -> DmarcResult:
    """DMARC for a message whose RFC5322.From domain is `from_domain` (module doc); `discovery`,
    from prefetch(resolver, from_domain), is the policy lookup already under way."""
    domain = normalize_domain(from_domain)
    if domain is None:
        return DmarcResult("permerror", from_domain.strip().lower()[:253], "none", "none")
    try:
        found = await (discovery if discovery is not None else discover(resolver, domain))
    except DnsTempError:
        return DmarcResult("temperror", domain, "none", "none")
    if found is None:
        return DmarcResult("none", domain, "none", "none")
    record, from_org = found
    if record.p is None or record.sp_invalid:
        policy = "none"  # step 6: acts as "v=DMARC1; p=none" thanks to a valid rua=
    elif from_org and record.sp is not None:
        policy = record.sp
    else:
        policy = record.p
    if not _sampled(record.pct, sample_key):
        policy = _LOWER[policy]
    spf_aligned = aligned(spf.domain, domain, record.aspf)
    if (spf.result == "pass" and spf_aligned) or any(
            d.result == "pass" and aligned(d.domain, domain, record.adkim) for d in dkim):
        return DmarcResult("pass", domain, policy, "none")
    if (spf.result == "temperror" and spf_aligned) or any(
            d.result == "temperror" and aligned(d.domain, domain, record.adkim) for d in dkim):
        return DmarcResult("temperror", domain, policy, "none")
    return DmarcResult("fail", domain, policy, policy)


__all__ = ["DmarcRecord", "DmarcResult", "aligned", "check_dmarc", "discover", "normalize_domain",
           "organizational_domain", "parse_record", "prefetch"]
