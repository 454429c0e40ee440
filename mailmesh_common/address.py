"""Mail addresses: parsing, validation and the canonical form mailmesh keys users by.

Implements the mailbox syntax of RFC 5321 4.1.2 (with RFC 6531 SMTPUTF8 local parts and
RFC 6532 UTF-8 in addresses) and the size limits of RFC 5321 4.5.3.1. Pure functions, no I/O.

The canonical form of an address lowercases the local part (mailmesh treats local parts
case-insensitively) and turns the domain into lowercase A-labels (IDNA 2008, UTS #46 mapping),
so ``Jörg@Bücher.DE`` and ``jörg@xn--bcher-kva.de`` name the same mailbox.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from email.header import decode_header, make_header

import idna

from mailmesh_common.errors import InvalidInput

__all__ = [
    "IPV6_SITE_PREFIX",
    "ROLE_LOCAL_PARTS",
    "MailAddress",
    "canonical",
    "client_key",
    "is_valid_mailbox",
    "parse_address",
    "split",
    "validate_domain",
]

# RFC 5321 4.5.3.1.1 / 4.5.3.1.2 and the 254-octet path limit (RFC 5321 4.5.3.1.3 minus <>).
MAX_LOCAL_OCTETS = 64
MAX_DOMAIN_OCTETS = 255
MAX_ADDRESS_OCTETS = 254
MAX_LABEL_OCTETS = 63
# Longest text parse_address looks at; anything longer cannot hold a valid mailbox and name.
MAX_ADDRESS_TEXT = 2048

# RFC 5322 3.2.3 atext (ASCII part); RFC 6532 3.2 adds UTF8-non-ascii.
_ATEXT_ASCII = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
# RFC 1035 2.3.1 letter-digit-hyphen label (case-insensitive).
_LDH_LABEL = re.compile(r"\A[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z", re.IGNORECASE)
# Unicode categories never allowed in an address: controls, format (bidi overrides,
# zero-width), surrogates, private use, unassigned, separators.
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
_ANGLE_ADDR = re.compile(r"\A(?P<name>.*?)\s*<(?P<addr>[^<>]*)>\s*\Z", re.DOTALL)


@dataclass(frozen=True)
class MailAddress:
    """One mailbox: a decoded display name and the address as written, domain lowercased."""

    name: str
    email: str

    def __str__(self) -> str:
        if not self.name:
            return self.email
        quoted = self.name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{self.email}>'


def _is_ok_non_ascii(ch: str) -> bool:
    return unicodedata.category(ch) not in _BAD_CATEGORIES


def _split_at(email: str) -> tuple[str, str] | None:
    """(local, domain) split at the one '@' outside a quoted string, or None."""
    at = -1
    in_quotes = False
    escaped = False
    for i, ch in enumerate(email):
        if escaped:
            escaped = False
        elif in_quotes and ch == "\\":
            escaped = True
        elif ch == '"':
            in_quotes = not in_quotes
        elif ch == "@" and not in_quotes:
            if at >= 0:
                return None  # a second '@' outside quotes
            at = i
    if at < 0 or in_quotes:
        return None
    return email[:at], email[at + 1 :]


def _valid_local(local: str) -> bool:
    """RFC 5321 4.1.2 Local-part = Dot-string / Quoted-string, UTF-8 allowed (RFC 6531 3.3)."""
    if not local or len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_OCTETS:
        return False
    if local.startswith('"'):
        if len(local) < 2 or not local.endswith('"'):
            return False
        body = local[1:-1]
        i = 0
        while i < len(body):
            ch = body[i]
            if ch == "\\":
                # quoted-pairSMTP = %d92 %d32-126
                if i + 1 >= len(body) or not (32 <= ord(body[i + 1]) <= 126):
                    return False
                i += 2
                continue
            if ch == '"':
                return False
            # qtextSMTP = %d32-33 / %d35-91 / %d93-126 / UTF8-non-ascii
            if ord(ch) < 32 or ord(ch) == 127 or (ord(ch) > 127 and not _is_ok_non_ascii(ch)):
                return False
            i += 1
        return True
    for atom in local.split("."):
        if not atom:
            return False  # leading, trailing or doubled dot
        for ch in atom:
            if ch in _ATEXT_ASCII:
                continue
            if ord(ch) > 127 and _is_ok_non_ascii(ch):
                continue
            return False
    return True


def _domain_to_ascii(domain: str) -> str:
    """Lowercase A-label form of a domain or address literal; raises InvalidInput."""
    if not domain:
        raise InvalidInput("domain is empty")
    if domain.startswith("["):
        # RFC 5321 4.1.3 address-literal: [IPv4] or [IPv6:...]
        if not domain.endswith("]"):
            raise InvalidInput("address literal is missing its closing ']'")
        inner = domain[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
            return f"[{ipaddress.IPv4Address(inner)}]"
        except ValueError:
            raise InvalidInput(f"invalid address literal {domain!r}") from None
    if domain.isascii():
        ascii_domain = domain.lower()
    else:
        for ch in domain:
            if ord(ch) > 127 and not _is_ok_non_ascii(ch):
                raise InvalidInput(f"domain {domain!r} contains a disallowed character")
        try:
            # RFC 5890/5891 IDNA 2008 with the UTS #46 mapping (case folding, full-width dots).
            ascii_domain = idna.encode(domain, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise InvalidInput(f"domain {domain!r} is not a valid internationalized name") from None
        ascii_domain = ascii_domain.lower()
    if len(ascii_domain) > MAX_DOMAIN_OCTETS:
        raise InvalidInput(f"domain is longer than {MAX_DOMAIN_OCTETS} octets")
    labels = ascii_domain.split(".")
    for label in labels:
        if not label:
            raise InvalidInput(f"domain {domain!r} has an empty label")
        if len(label) > MAX_LABEL_OCTETS:
            raise InvalidInput(f"domain label {label[:20]!r}... is longer than 63 octets")
        if not _LDH_LABEL.match(label):
            raise InvalidInput(f"domain label {label!r} is not letters, digits and hyphens")
    if labels[-1].isdigit():
        raise InvalidInput(f"domain {domain!r} has a numeric top-level label")
    return ascii_domain


def validate_domain(domain: str) -> str:
    """The canonical (lowercase, A-label) form of a domain name, or InvalidInput.
    Surrounding whitespace and one trailing dot (a fully qualified DNS name) are dropped."""
    if not isinstance(domain, str):
        raise InvalidInput("domain must be a string")
    domain = domain.strip()
    if domain.endswith(".") and not domain.endswith(".."):
        domain = domain[:-1]
    return _domain_to_ascii(domain)


def _checked_parts(email: str) -> tuple[str, str]:
    """Validate a bare mailbox; return (local as written, canonical A-label domain)."""
    if not email:
        raise InvalidInput("address is empty")
    if len(email) > MAX_ADDRESS_TEXT:
        raise InvalidInput("address is too long")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in email):
        raise InvalidInput("address contains control characters")
    parts = _split_at(email)
    if parts is None:
        raise InvalidInput(f"address {email!r} must contain exactly one '@' outside quotes")
    local, domain = parts
    if not local:
        raise InvalidInput(f"address {email!r} has an empty local part")
    if len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_OCTETS:
        raise InvalidInput(f"local part is longer than {MAX_LOCAL_OCTETS} octets")
    if not _valid_local(local):
        raise InvalidInput(f"address {email!r} has an invalid local part")
    ascii_domain = _domain_to_ascii(domain)
    if len(local.encode("utf-8", "surrogatepass")) + 1 + len(ascii_domain) > MAX_ADDRESS_OCTETS:
        raise InvalidInput(f"address is longer than {MAX_ADDRESS_OCTETS} octets")
    return local, ascii_domain


def is_valid_mailbox(email: str) -> bool:
    """True if email is a bare RFC 5321 mailbox (local@domain) within the RFC 5321 limits."""
    if not isinstance(email, str):
        return False
    try:
        _checked_parts(email)
    except InvalidInput:
        return False
    return True


def _strip_brackets(email: str) -> str:
    text = email.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    return text


# A site is given at least an IPv6 /64 and may use any address of it (RFC 6177)
IPV6_SITE_PREFIX = 64


def client_key(ip: str) -> str:
    """What per-client limits count a client address under: an IPv4 address as it is (also when
    IPv4-mapped, as a dual-stack listener reports it), an IPv6 address by its /64, since counting
    single addresses would not hold a client that rotates through its /64; anything else as given."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, IPV6_SITE_PREFIX), strict=False))
    return ip


# Role mailboxes every mail domain answers for (RFC 5321 4.5.1: postmaster MUST; RFC 2142: abuse)
ROLE_LOCAL_PARTS = frozenset({"postmaster", "abuse"})


def canonical(email: str) -> str:
    """The form mailmesh keys a mailbox by: local part lowercased (NFC), domain as lowercase
    A-labels; surrounding whitespace and <> removed. InvalidInput if it is not a mailbox."""
    if not isinstance(email, str):
        raise InvalidInput("address must be a string")
    local, domain = _checked_parts(_strip_brackets(email))
    return f"{unicodedata.normalize('NFC', local).lower()}@{domain}"


def split(email: str) -> tuple[str, str]:
    """(local, domain) of the canonical form of email."""
    local, _, domain = canonical(email).rpartition("@")
    return local, domain


def _decode_name(name: str) -> str:
    name = name.strip()
    if "=?" in name:
        try:
            name = str(make_header(decode_header(name)))
        except (ValueError, LookupError, UnicodeError, AssertionError):
            pass
    if len(name) >= 2 and name.startswith('"') and name.endswith('"'):
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
    return " ".join(name.split())


def _lower_domain(email: str) -> str:
    local, _, domain = email.rpartition("@")
    return email if domain.startswith("[") else f"{local}@{domain.lower()}"


def parse_address(text: str) -> MailAddress:
    """Parse ``Name <local@domain>``, ``<local@domain>`` or a bare ``local@domain``.

    The name may be quoted or RFC 2047 encoded. The address keeps its local part as written
    and has its domain lowercased. Raises InvalidInput with the reason for anything else.
    """
    if not isinstance(text, str):
        raise InvalidInput("address must be a string")
    if len(text) > MAX_ADDRESS_TEXT:
        raise InvalidInput("address is too long")
    if any(ch in text for ch in "\r\n\x00"):
        raise InvalidInput("address contains a line break or NUL")
    stripped = text.strip()
    if not stripped:
        raise InvalidInput("address is empty")
    match = _ANGLE_ADDR.match(stripped)
    if match:
        name = _decode_name(match.group("name"))
        addr = match.group("addr").strip()
    elif "<" in stripped or ">" in stripped:
        raise InvalidInput(f"address {stripped!r} has unbalanced angle brackets")
    else:
        name, addr = "", stripped
    _checked_parts(addr)
    return MailAddress(name=name, email=_lower_domain(addr))
