"""Weighted spam rules: local header and body checks plus the ingest's SPF/DKIM/DMARC results.

Each rule is a named test in the style of SpamAssassin (the names appear in X-Spam-Status);
a hit adds its weight to the score. Weights are small next to the Bayesian evidence: rules
break ties and catch what the token model has not learnt yet. No rule looks at the network
(DNSBLs and the like) or at how old a message is. Pure functions, no I/O.

    FROM_NAME_DOMAIN_MISMATCH  From's display name shows a domain other than the address's
    LINK_TEXT_HOST_MISMATCH    a link's visible text is a URL on another host than its href
    LINK_TO_IP                 a link points at a numeric IP address
    SUBJ_ALL_CAPS              the subject is written in capitals only
    MISSING_DATE, MISSING_MID, MISSING_FROM   required RFC 5322 3.6 fields absent
    DATE_IN_FUTURE             Date more than a day ahead of now
    HTML_ONLY_LITTLE_TEXT      HTML without a text part and with almost no visible text
    HTML_IMAGE_ONLY            ... whose content is essentially images
    HTML_COMMENT_SPLIT         HTML comments inside words (V<!-- x -->iagra)
    HTML_IN_TEXT_PLAIN         HTML markup (two tags or more) in a text/plain body, no HTML part
    TEXT_BASE64                a text/plain or text/html part in base64 transfer encoding
    BODY_MOSTLY_CAPS           the visible text is mostly capitals
    MID_NO_AT                  a Message-ID without an @
    DATE_MALFORMED             Date without a time zone, or with a two-digit year
    FROM_EMPTY_COMMENT         From ends in an empty comment: "user@example.com ()"
    PRIORITY_HIGH              X-Priority 1 or X-MSMail-Priority High
    SPF_FAIL, SPF_SOFTFAIL, DKIM_FAIL, DMARC_FAIL   authentication failures (RFC 7208/6376/7489)
    SPF_PASS, DKIM_VALID, DMARC_PASS                small credits for passing

The message-form rules (HTML_COMMENT_SPLIT .. PRIORITY_HIGH) describe how 2002-era spam tools
built mail, found in the spam that cross-validation inside the training part of the
development corpus missed (tests/bench/cv_spam.py; figures in combine.py). Like every local
rule their weight is learned by the combiner from the mail `spam train` saw, so they count as
much as that mail says: trained on current mail, where e.g. base64 text parts are common in
legitimate mail, TEXT_BASE64 learns a smaller weight. They cost ~0.13 ms of CPU per message.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from svc_ingest.spam.tokenizer import Analysis, host_of, registered_domain

__all__ = ["AUTH_RULES", "DEFAULT_WEIGHTS", "LOCAL_RULES", "AuthSummary", "RuleHit", "evaluate"]

DEFAULT_WEIGHTS: Mapping[str, float] = {
    "FROM_NAME_DOMAIN_MISMATCH": 1.0,
    "LINK_TEXT_HOST_MISMATCH": 2.0,
    "LINK_TO_IP": 0.8,
    "SUBJ_ALL_CAPS": 1.0,
    "MISSING_DATE": 1.0,
    "MISSING_MID": 0.8,
    "MISSING_FROM": 1.5,
    "DATE_IN_FUTURE": 1.0,
    "HTML_ONLY_LITTLE_TEXT": 0.8,
    "HTML_IMAGE_ONLY": 1.2,
    "HTML_COMMENT_SPLIT": 1.0,
    "HTML_IN_TEXT_PLAIN": 0.5,
    "TEXT_BASE64": 0.8,
    "BODY_MOSTLY_CAPS": 0.5,
    "MID_NO_AT": 0.8,
    "DATE_MALFORMED": 0.8,
    "FROM_EMPTY_COMMENT": 0.5,
    "PRIORITY_HIGH": 0.3,
    "SPF_FAIL": 1.5,
    "SPF_SOFTFAIL": 0.7,
    "DKIM_FAIL": 1.0,
    "DMARC_FAIL": 2.5,
    "SPF_PASS": -0.1,
    "DKIM_VALID": -0.1,
    "DMARC_PASS": -0.3,
}

# Rules judged from the message alone: their weights are learned with the Bayesian model's
# scores (combine.py) when `mailmesh spam train` saw them fire often enough; the DEFAULT_WEIGHTS
# points count otherwise. The authentication rules need an SMTP session and keep their points.
AUTH_RULES = ("SPF_FAIL", "SPF_SOFTFAIL", "DKIM_FAIL", "DMARC_FAIL", "SPF_PASS", "DKIM_VALID",
              "DMARC_PASS")
LOCAL_RULES = tuple(name for name in DEFAULT_WEIGHTS if name not in AUTH_RULES)

SUBJ_CAPS_MIN_LETTERS = 10
LITTLE_TEXT_CHARS = 300  # visible characters below which an HTML-only body is "little text"
FUTURE_SLACK = timedelta(days=1)

_DOMAIN_IN_TEXT = re.compile(r"(?:[a-z0-9-]{1,63}\.)+(?:com|net|org|info|biz|edu|gov|us|uk|de|ca|au|"
                             r"[a-z]{2})\b", re.I)
_IPV4_HOST = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_URLISH = re.compile(r"^(?:(?:https?|ftp)://|www\.)\S+$", re.I)
_IMG = re.compile(r"<img\b", re.I)
_HOSTNAME = re.compile(r"(?:[a-z0-9-]{1,63}\.)+[a-z]{2,24}")
_COMMENT_SPLIT = re.compile(r"\w<!--[^>]{0,40}-->\w")
_MARKUP = re.compile(r"<(?:html|body|table|font|p|br)\b", re.I)
_BASE64_CTE = re.compile(rb"\ncontent-transfer-encoding:[ \t]*base64")
_TEXT_CTYPE = re.compile(rb"\ncontent-type:[ \t]*text/(?:plain|html)\b")
_DATE_ZONE = re.compile(r"(?:[+-]\d{4}|\b(?:UT|GMT|[A-Z]{3,4}))\s*(?:\(.*\))?\s*$")
_DATE_SHORT_YEAR = re.compile(r"\b\d{1,2}\s+[A-Za-z]{3}\s+\d{2}\s")
COMMENT_SPLITS = 2  # comments inside words before HTML_COMMENT_SPLIT fires
MARKUP_TAGS = 2  # HTML tags in a text/plain body before HTML_IN_TEXT_PLAIN fires (a mention is not markup)
CAPS_MIN_LETTERS = 200  # visible letters BODY_MOSTLY_CAPS needs
CAPS_SHARE = 0.4
SCAN_TEXT_CHARS = 5000  # visible text looked at for BODY_MOSTLY_CAPS and HTML_IN_TEXT_PLAIN
SCAN_RAW_BYTES = 64 * 1024  # raw bytes scanned for base64 text parts
MAX_SCAN_HTML = 200_000  # HTML characters searched for comments inside words


@dataclass(frozen=True)
class AuthSummary:
    """SPF, DKIM and DMARC results as written in Authentication-Results (RFC 8601)."""

    spf: str = "none"
    dkim: str = "none"
    dmarc: str = "none"


@dataclass(frozen=True)
class RuleHit:
    """A rule that matched: its name, the points it adds, and why."""

    name: str
    points: float
    description: str


def _from_name_mismatch(analysis: Analysis) -> str | None:
    parsed = analysis.parsed
    if not parsed.from_:
        return None
    sender = parsed.from_[0]
    if "@" not in sender.email or not sender.name:
        return None
    own = registered_domain(sender.email.rpartition("@")[2])
    for m in _DOMAIN_IN_TEXT.finditer(sender.name.lower()):
        shown = registered_domain(m.group(0))
        if "." in shown and shown != own:
            return f"display name shows {shown}, address is at {own}"
    return None


def _link_mismatch(analysis: Analysis) -> str | None:
    for link in analysis.links:
        text = link.text.strip().rstrip("/.")
        if not _URLISH.match(text):
            continue
        shown = host_of(text if "://" in text else "http://" + text)
        target = host_of(link.href)
        if _HOSTNAME.fullmatch(shown) and target and registered_domain(shown) != registered_domain(target):
            return f"link text shows {registered_domain(shown)}, points to {registered_domain(target)}"
    return None


def _link_to_ip(analysis: Analysis) -> bool:
    return any(_IPV4_HOST.fullmatch(host_of(link.href)) for link in analysis.links
               if link.href.lower().startswith(("http:", "https:")))


def _subject_all_caps(subject: str) -> bool:
    letters = [c for c in subject if c.isalpha()]
    return len(letters) >= SUBJ_CAPS_MIN_LETTERS and all(c.isupper() for c in letters)


def _text_base64(raw: bytes) -> bool:
    """Whether a part header block declares a text/plain or text/html body in base64: spam
    tooling encodes text to hide its words from filters (mail clients of the time did not)."""
    data = b"\n" + raw[:SCAN_RAW_BYTES].lower().replace(b"\r\n", b"\n")
    for m in _BASE64_CTE.finditer(data):
        # the header block holding the field: between the blank lines around it
        lo, hi = max(0, m.start() - 2000), m.end() + 2000
        start, end = data.rfind(b"\n\n", lo, m.start()), data.find(b"\n\n", m.end(), hi)
        if _TEXT_CTYPE.search(data, start if start >= 0 else lo, end if end >= 0 else hi):
            return True
    return False


_ASCII_LETTERS = string.ascii_letters.encode()
_ASCII_UPPER = string.ascii_uppercase.encode()


def _mostly_caps(text: str) -> bool:
    head = text[:SCAN_TEXT_CHARS]
    if head.isascii():
        # the same counts as below (ASCII letters are the only ASCII isalpha/isupper
        # characters), by deleting them in C instead of a call per character
        raw = head.encode("ascii")
        letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS))
        return letters >= CAPS_MIN_LETTERS and len(raw) - len(raw.translate(None, _ASCII_UPPER)) > CAPS_SHARE * letters
    letters = sum(map(str.isalpha, head))
    return letters >= CAPS_MIN_LETTERS and sum(map(str.isupper, head)) > CAPS_SHARE * letters


def _date_malformed(value: str) -> bool:
    """A Date field without a time zone or with a two-digit year (RFC 5322 3.3 requires the
    zone; the obsolete two-digit year is what 2002's spam tools wrote)."""
    value = value.strip()
    return _DATE_ZONE.search(value) is None or _DATE_SHORT_YEAR.search(value) is not None


def _auth_hits(auth: AuthSummary, weights: Mapping[str, float]) -> list[RuleHit]:
    hits = []
    spf, dkim, dmarc = auth.spf.lower(), auth.dkim.lower(), auth.dmarc.lower()
    if spf == "fail":
        hits.append(RuleHit("SPF_FAIL", weights["SPF_FAIL"], "SPF: sender not permitted (fail)"))
    elif spf == "softfail":
        hits.append(RuleHit("SPF_SOFTFAIL", weights["SPF_SOFTFAIL"], "SPF: softfail"))
    elif spf == "pass":
        hits.append(RuleHit("SPF_PASS", weights["SPF_PASS"], "SPF: pass"))
    if dkim == "fail":
        hits.append(RuleHit("DKIM_FAIL", weights["DKIM_FAIL"], "DKIM signature does not verify"))
    elif dkim == "pass":
        hits.append(RuleHit("DKIM_VALID", weights["DKIM_VALID"], "DKIM: valid signature"))
    if dmarc == "fail":
        hits.append(RuleHit("DMARC_FAIL", weights["DMARC_FAIL"], "DMARC: From domain not aligned"))
    elif dmarc == "pass":
        hits.append(RuleHit("DMARC_PASS", weights["DMARC_PASS"], "DMARC: pass"))
    return hits


def evaluate(analysis: Analysis, auth: AuthSummary | None = None, *,
             weights: Mapping[str, float] = DEFAULT_WEIGHTS,
             now: datetime | None = None) -> list[RuleHit]:
    """Every rule that matches `analysis`; auth None means "not checked" (no auth rules)."""
    w = {**DEFAULT_WEIGHTS, **weights}
    hits: list[RuleHit] = []
    parsed = analysis.parsed

    def hit(name: str, description: str) -> None:
        if w.get(name, 0.0):
            hits.append(RuleHit(name, w[name], description))

    why = _from_name_mismatch(analysis)
    if why:
        hit("FROM_NAME_DOMAIN_MISMATCH", why)
    why = _link_mismatch(analysis)
    if why:
        hit("LINK_TEXT_HOST_MISMATCH", why)
    if _link_to_ip(analysis):
        hit("LINK_TO_IP", "a link points at a numeric IP address")
    if _subject_all_caps(parsed.subject):
        hit("SUBJ_ALL_CAPS", "subject is all capitals")
    if not analysis.has_header("date"):
        hit("MISSING_DATE", "no Date header")
    elif parsed.date is not None and parsed.date > (now or datetime.now(UTC)) + FUTURE_SLACK:
        hit("DATE_IN_FUTURE", "Date is more than a day in the future")
    if not parsed.message_id:
        hit("MISSING_MID", "no Message-ID header")
    if not analysis.has_header("from"):
        hit("MISSING_FROM", "no From header")
    if parsed.html_body and not parsed.text_body.strip():
        visible = len("".join(analysis.html_text.split()))
        if visible < LITTLE_TEXT_CHARS:
            if _IMG.search(parsed.html_body):
                hit("HTML_IMAGE_ONLY", "HTML-only message that is mostly images")
            else:
                hit("HTML_ONLY_LITTLE_TEXT", "HTML-only message with little text")
    html = parsed.html_body
    if html:
        if len(_COMMENT_SPLIT.findall(html[:MAX_SCAN_HTML])) >= COMMENT_SPLITS:
            hit("HTML_COMMENT_SPLIT", "HTML comments inside words")
    elif len(_MARKUP.findall(parsed.text_body[:SCAN_TEXT_CHARS])) >= MARKUP_TAGS:
        hit("HTML_IN_TEXT_PLAIN", "HTML markup in a text/plain body")
    if _text_base64(analysis.raw):
        hit("TEXT_BASE64", "text body in base64 transfer encoding")
    if _mostly_caps(parsed.text_body if parsed.text_body.strip() else analysis.html_text):
        hit("BODY_MOSTLY_CAPS", "the text is mostly capitals")
    mid = analysis.header("message-id")
    if mid is not None and mid.strip() and "@" not in mid:
        hit("MID_NO_AT", "Message-ID without an @")
    date = analysis.header("date")
    if date is not None and _date_malformed(date):
        hit("DATE_MALFORMED", "Date without a time zone or with a two-digit year")
    if (analysis.header("from") or "").rstrip().endswith("()"):
        hit("FROM_EMPTY_COMMENT", "From ends in an empty comment")
    if (analysis.header("x-priority") or "").strip().startswith("1") or \
            (analysis.header("x-msmail-priority") or "").strip().lower().startswith("high"):
        hit("PRIORITY_HIGH", "sent at high priority")
    if auth is not None:
        hits.extend(_auth_hits(auth, w))
    return hits
