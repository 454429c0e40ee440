"""The Authentication-Results header (RFC 8601) that records what SPF, DKIM and DMARC said:

    mx.example.net; spf=pass smtp.mailfrom=example.com;
     dkim=pass header.d=example.com header.s=sel header.a=rsa-sha256;
     dmarc=pass (p=reject dis=none) header.from=example.com

(one line; the message writer folds it). Everything that came from the remote side (domains,
reasons, explanations) is reduced to printable ASCII: no CR/LF can reach the header, comments
are escaped (RFC 5322 3.2.2) and bounded, and values that are not RFC 2045 tokens are quoted.
"""

from __future__ import annotations

import re

from svc_ingest.checks.dkim import DkimResult
from svc_ingest.checks.dmarc import DmarcResult
from svc_ingest.checks.spf import SpfResult

MAX_COMMENT = 100
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+$")  # RFC 2045 token (no tspecials)
_DOMAIN = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_RESULT = re.compile(r"^[a-z]+$")


def _printable(text: str) -> str:
    """Printable ASCII with runs of whitespace and control characters as one space."""
    text = "".join(c if " " <= c <= "~" else " " for c in text)
    return re.sub(r" {2,}", " ", text).strip()


def _value(text: str) -> str:
    """A pvalue: a token, a domain name, or else a quoted-string (RFC 8601 2.2)."""
    text = _printable(text)
    if text and (_TOKEN.match(text) or _DOMAIN.match(text)):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    text = _printable(text)
    if len(text) > MAX_COMMENT:
        text = text[:MAX_COMMENT - 3] + "..."
    if not text:
        return ""
    return " (" + re.sub(r"([()\\])", r"\\\1", text) + ")"


def _result(result: str) -> str:
    return result if _RESULT.match(result) else "permerror"


def _spf(spf: SpfResult) -> str:
    out = f"spf={_result(spf.result)}"
    if spf.result != "pass" and spf.explanation:
        out += _comment(spf.explanation)
    if spf.domain:
        ptype = "smtp.helo" if spf.scope == "helo" else "smtp.mailfrom"
        out += f" {ptype}={_value(spf.domain)}"
    return out


def _dkim(sig: DkimResult) -> str:
    out = f"dkim={_result(sig.result)}" + _comment(sig.reason)
    for ptype, value in (("header.d", sig.domain), ("header.s", sig.selector), ("header.a", sig.algorithm)):
        if value:
            out += f" {ptype}={_value(value)}"
    return out


def _dmarc(dmarc: DmarcResult, header_from: str) -> str:
    out = f"dmarc={_result(dmarc.result)}"
    if dmarc.result in ("pass", "fail", "temperror"):
        out += f" (p={_printable(dmarc.policy)} dis={_printable(dmarc.disposition)})"
    domain = header_from or dmarc.domain
    if domain:
        out += f" header.from={_value(domain)}"
    return out


def authentication_results(authserv_id: str, spf: SpfResult, dkim: list[DkimResult], dmarc: DmarcResult,
                           *, header_from: str = "") -> str:
    """The header's value, without "Authentication-Results: "; no signatures give dkim=none."""
    parts = [_value(authserv_id), _spf(spf)]
    parts += [_dkim(sig) for sig in dkim] if dkim else ["dkim=none"]
    parts.append(_dmarc(dmarc, header_from))
    return "; ".join(parts)


__all__ = ["authentication_results"]
