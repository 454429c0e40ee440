"""Raw RFC 5322 / MIME messages to ParsedMessage: headers, bodies, attachments, snippet.

Built on the stdlib email package (compat32 for the MIME structure, policy.default for the
header values it uses) and hardened for mail as it arrives: malformed headers, unknown
charsets, broken transfer encodings, missing boundaries, 8-bit headers and plain garbage
never raise. The parser fills what it can and records each problem in
ParsedMessage.parse_warnings. Work is bounded (header lengths, MIME depth and part count, body
characters), so hostile input cannot make it slow. Pure functions, no I/O.

Part ids follow the IMAP section numbering (RFC 3501 6.4.5): the body of a single-part
message is "1"; the children of a multipart are "1", "2", ...; nested multiparts add ".n".
A message/* part is a leaf (an attachment); its own parts are not numbered.
"""

from __future__ import annotations

import codecs
import functools
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email import policy as email_policy
from email.generator import BytesGenerator
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from email.utils import collapse_rfc2231_value, getaddresses, parsedate_tz
from typing import Any

from mailmesh_common.address import MailAddress
from mailmesh_common.errors import NotFound
from mailmesh_common.mime.html import html_to_text

__all__ = [
    "AttachmentInfo",
    "MailAddress",
    "ParsedMessage",
    "get_attachment",
    "parse_message",
]

SNIPPET_CHARS = 200
MAX_DEPTH = 40  # MIME nesting deeper than this is not walked
MAX_PARTS = 2000  # leaf parts looked at per message
MAX_WARNINGS = 100
MAX_HEADER_CHARS = 100_000  # one header value; the rest is ignored
# The policy.default header parser is slow (quadratic) on some inputs, e.g. thousands of
# quotes. It only sees values that look tame, and at most STRUCTURED_BUDGET characters per
# message; everything else goes through the lenient compat32-era functions.
STRUCTURED_MAX_CHARS = 4096
STRUCTURED_BUDGET = 32_768
MAX_ADDRESSES = 2000  # per address header
MAX_IDS = 500  # message ids per In-Reply-To / References
SNIPPET_HTML_CHARS = 300_000  # HTML converted for a snippet when there is no text body

_POLICY = email_policy.default
# The MIME structure is parsed with compat32, which keeps header values as source strings
# (much faster: the feed parser reads Content-Type often); header values are parsed with
# _POLICY only where they are used.
_STRUCTURE_POLICY = email_policy.compat32
# For re-serialising message/* parts: keep the source header lines as they are.
_GEN_POLICY = email_policy.default.clone(refold_source="none", cte_type="8bit", linesep="\r\n")

# Charset labels Python does not know, or knows a narrower variant of (WHATWG encoding spec).
_CHARSET_ALIASES = {
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "ks_c_5601-1989": "cp949",
    "euc-kr": "cp949",
    "x-sjis": "cp932",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "windows-31j": "cp932",
    "unicode-1-1-utf-7": "utf-7",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "iso-8859-8-i": "iso-8859-8",
    "tis-620": "cp874",
    "windows-874": "cp874",
    "x-mac-roman": "mac-roman",
    "macintosh": "mac-roman",
    "utf8": "utf-8",
    "x-user-defined": "latin-1",
    "ansi_x3.4-1968": "ascii",
}
_NO_CHARSET = frozenset({"unknown-8bit", "x-unknown", "unknown", "binary", "8bit", "default"})

# Readable text for the email package's defects that carry no message of their own.
_DEFECT_TEXT = {
    "NoBoundaryInMultipartDefect": "multipart without a boundary parameter",
    "StartBoundaryNotFoundDefect": "multipart boundary never appears in the body",
    "CloseBoundaryNotFoundDefect": "multipart closing boundary missing",
    "MultipartInvariantViolationDefect": "multipart content type but no parts",
    "FirstHeaderLineIsContinuationDefect": "first header line is a continuation line",
    "MisplacedEnvelopeHeaderDefect": "'From ' envelope line inside the header section",
    "MissingHeaderBodySeparatorDefect": "header section not ended by an empty line",
    "MalformedHeaderDefect": "malformed header line",
    "InvalidMultipartContentTransferEncodingDefect": "multipart with a transfer encoding "
    "other than 7bit, 8bit or binary",
    "InvalidBase64PaddingDefect": "base64 body has bad padding",
    "InvalidBase64CharactersDefect": "base64 body has characters outside the alphabet",
    "InvalidBase64LengthDefect": "base64 body has an impossible length",
    "UndecodableBytesDefect": "header has undecodable 8-bit bytes",
}
# UTF-8 local parts are valid under RFC 6532; not worth a warning.
_QUIET_DEFECTS = frozenset({"NonASCIILocalPartDefect"})

_MSG_ID = re.compile(r"<([^<>]*)>")
_SURROGATES = re.compile(r"[\udc80-\udcff]")
_WS = re.compile(r"\s+")
_LIST_ID = re.compile(r"<([^<>]+)>")


@dataclass(frozen=True)
class AttachmentInfo:
    """One attachment (or inline part) of a message; size is in decoded bytes."""

    part_id: str
    filename: str
    content_type: str
    size: int
    content_id: str
    inline: bool


@dataclass
class ParsedMessage:
    """Everything mailmesh reads out of one raw message.

    Addresses keep their local part as written and have their domain lowercased; names are
    RFC 2047 decoded. date is UTC (None if missing or invalid). Message ids carry no angle
    brackets. text_body is the first text/plain body part (plus later unnamed text/plain
    parts outside multipart/alternative, e.g. list footers), html_body the first text/html
    one; neither is derived from the other. snippet comes from text_body, else from the HTML.
    attachments lists every other leaf part that is not an alternative of the body, inline
    images included; has_attachments is true for a part with Content-Disposition attachment,
    a file name, or message/rfc822.
    """

    subject: str = ""
    from_: list[MailAddress] = field(default_factory=list)
    sender: MailAddress | None = None
    reply_to: list[MailAddress] = field(default_factory=list)
    to: list[MailAddress] = field(default_factory=list)
    cc: list[MailAddress] = field(default_factory=list)
    bcc: list[MailAddress] = field(default_factory=list)
    date: datetime | None = None
    message_id: str = ""
    in_reply_to: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    text_body: str = ""
    html_body: str = ""
    snippet: str = ""
    attachments: list[AttachmentInfo] = field(default_factory=list)
    has_attachments: bool = False
    headers_size: int = 0
    size: int = 0
    list_id: str = ""
    auto_submitted: bool = False
    parse_warnings: list[str] = field(default_factory=list)


class _Context:
    """One parse: its bounded, de-duplicated problem list and a per-part header index."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._seen: set[str] = set()
        self._headers: dict[int, tuple[Message, dict[str, list[str]]]] = {}
        self._ctypes: dict[int, tuple[Message, str]] = {}
        self.structured_budget = STRUCTURED_BUDGET

    def header_index(self, part: Message) -> dict[str, list[str]]:
        """Source values of the part's headers by lowercased name (built once per part)."""
        cached = self._headers.get(id(part))
        if cached is not None and cached[0] is part:
            return cached[1]
        index: dict[str, list[str]] = {}
        try:
            items = part.raw_items() if hasattr(part, "raw_items") else part.items()
            for key, value in items:
                index.setdefault(str(key).lower(), []).append(value)
        except Exception as exc:
            self.warn(f"headers could not be read ({type(exc).__name__})")
        self._headers[id(part)] = (part, index)
        return index

    def content_type(self, part: Message) -> str:
        """_content_type(part), worked out once per part."""
        cached = self._ctypes.get(id(part))
        if cached is not None and cached[0] is part:
            return cached[1]
        ctype = _content_type(part)
        self._ctypes[id(part)] = (part, ctype)
        return ctype

    def warn(self, text: str) -> None:
        text = text[:300]
        if text in self._seen:
            return
        if len(self.items) >= MAX_WARNINGS:
            if len(self.items) == MAX_WARNINGS:
                self.items.append("too many problems; the rest are not listed")
            return
        self._seen.add(text)
        self.items.append(text)

    def defects(self, where: str, defects: Any) -> None:
        try:
            for defect in defects or ():
                kind = type(defect).__name__
                if kind in _QUIET_DEFECTS:
                    continue
                detail = str(defect).strip().rstrip(")")
                if not detail or detail == kind:
                    detail = _DEFECT_TEXT.get(kind, kind)
                self.warn(f"{where}: {detail}")
        except Exception:
            pass


# --------------------------------------------------------------------------- headers


def _headers_size(raw: bytes) -> int:
    """Octets of the header section including the empty line that ends it."""
    ends = [(i, n) for i, n in ((raw.find(b"\r\n\r\n"), 4), (raw.find(b"\n\n"), 2)) if i >= 0]
    if raw.startswith(b"\r\n"):
        return 2
    if raw.startswith(b"\n"):
        return 1
    if not ends:
        return len(raw)
    i, n = min(ends)
    return i + n


def _fix_8bit(value: str, name: str, ctx: _Context) -> str:
    """Header text from BytesParser keeps raw 8-bit octets as surrogates; decode them
    as UTF-8 (RFC 6532) or, failing that, as windows-1252."""
    if not _SURROGATES.search(value):
        return value
    data = value.encode("ascii", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        ctx.warn(f"{name}: 8-bit header is not UTF-8; decoded as windows-1252")
        return data.decode("cp1252", "replace")


def _raw_values(part: Message, name: str, ctx: _Context) -> list[str]:
    """Unfolded source values of every header called name, 8-bit text decoded."""
    out: list[str] = []
    try:
        for value in ctx.header_index(part).get(name.lower(), ()):
            if not isinstance(value, str):
                value = str(value)
            value = value[:MAX_HEADER_CHARS]
            value = "".join(value.splitlines())
            out.append(_fix_8bit(value, name, ctx))
    except Exception as exc:
        ctx.warn(f"{name}: header could not be read ({type(exc).__name__})")
    return out


def _first_raw(part: Message, name: str, ctx: _Context) -> str | None:
    values = _raw_values(part, name, ctx)
    return values[0] if values else None


def _tame(value: str) -> bool:
    return (
        len(value) <= STRUCTURED_MAX_CHARS
        and value.count('"') <= 64
        and value.count("(") <= 32
        and value.count("\\") <= 32
        and value.count("=?") <= 32
    )


class _Failed:
    """A header value the structured parser raised on (its exception's type name)."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


# Parsed header objects by (name, value): the structured parse is a pure function of them and
# its objects are only read, so mail that repeats a value (a list's To, a sender's From) is
# parsed once. Bounded: values up to CACHED_VALUE_CHARS, CACHED_VALUES of them (cleared when
# full), so hostile mail cannot make the cache large.
CACHED_VALUE_CHARS = 512
CACHED_VALUES = 1024
_STRUCTURED_CACHE: dict[tuple[str, str], Any] = {}


def _structured(name: str, value: str) -> Any:
    key = (name, value)
    cached = _STRUCTURED_CACHE.get(key)
    if cached is not None:
        return cached
    try:
        header: Any = _POLICY.header_factory(name, value)
    except Exception as exc:
        header = _Failed(type(exc).__name__)
    if len(value) > CACHED_VALUE_CHARS:
        return header
    if len(_STRUCTURED_CACHE) >= CACHED_VALUES:
        _STRUCTURED_CACHE.clear()
    _STRUCTURED_CACHE[key] = header
    return header


def _header_obj(name: str, value: str, ctx: _Context, *, report: bool = True) -> Any:
    """A policy.default header object for value, or None if the header parser failed or the
    value is too long or odd for it (callers then fall back to lenient parsing)."""
    if not _tame(value) or ctx.structured_budget < len(value):
        ctx.warn(f"{name}: header too long or complex; parsed leniently")
        return None
    ctx.structured_budget -= len(value)
    header = _structured(name, value)
    if isinstance(header, _Failed):
        ctx.warn(f"{name}: header could not be parsed ({header.kind})")
        return None
    if report:
        ctx.defects(name, getattr(header, "defects", ()))
    return header


def _decode_words(value: str) -> str:
    """RFC 2047 decoding without the structured-header parser (fallback path)."""
    try:
        return str(make_header(decode_header(value)))
    except Exception:
        return value


def _text_header(part: Message, name: str, ctx: _Context) -> str:
    value = _first_raw(part, name, ctx)
    if value is None:
        return ""
    header = _header_obj(name, value, ctx)
    try:
        text = str(header) if header is not None else _decode_words(value)
    except Exception:
        text = _decode_words(value)
    return _fix_8bit(text, name, ctx)


def _lower_domain(addr: str) -> str:
    local, at, domain = addr.rpartition("@")
    return f"{local}@{domain.lower()}" if at else addr


def _clean_name(name: str) -> str:
    return " ".join(name.replace("\x00", "").split())


# An address list with nothing but plain names, angle brackets and addresses: the fast parser
# gives the same result as the structured one, at a fraction of its cost.
_SIMPLE_ADDRESSES = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~@<>, \t\r\n-]*")


def _simple_addresses(value: str) -> tuple[tuple[str, str], ...] | None:
    """(name, address) pairs of a plain address list, else None (short values cached)."""
    if len(value) <= CACHED_VALUE_CHARS:
        return _simple_addresses_cached(value)
    return _simple_addresses_uncached(value)


def _simple_addresses_uncached(value: str) -> tuple[tuple[str, str], ...] | None:
    if "=?" in value or not _SIMPLE_ADDRESSES.fullmatch(value):
        return None
    pairs = getaddresses([value])
    if any(not a or a.count("@") != 1 for _, a in pairs):
        return None
    return tuple(pairs[:MAX_ADDRESSES])


_simple_addresses_cached = functools.lru_cache(maxsize=CACHED_VALUES)(_simple_addresses_uncached)


def _addresses(part: Message, name: str, ctx: _Context) -> list[MailAddress]:
    out: list[MailAddress] = []
    for value in _raw_values(part, name, ctx):
        if not value.strip():
            continue
        simple = _simple_addresses(value)
        if simple is not None:
            for display, addr_spec in simple:
                out.append(MailAddress(name=_clean_name(display), email=_lower_domain(addr_spec.strip())))
            continue
        header = _header_obj(name, value, ctx)
        parsed: list[tuple[str, str]] = []
        try:
            if header is None:
                raise ValueError("no header object")
            for addr in header.addresses[:MAX_ADDRESSES]:
                parsed.append((str(addr.display_name or ""), str(addr.addr_spec or "")))
        except Exception:
            try:
                parsed = [
                    (_decode_words(n), a) for n, a in getaddresses([value])[:MAX_ADDRESSES]
                ]
            except Exception:
                ctx.warn(f"{name}: addresses could not be parsed")
                parsed = []
        for display, addr_spec in parsed:
            addr_spec = addr_spec.strip().strip("<>").strip()
            if addr_spec in ("", "<>", "@"):
                continue
            out.append(MailAddress(name=_clean_name(display), email=_lower_domain(addr_spec)))
    return out


def _msg_ids(value: str) -> list[str]:
    """Message ids in header order, without angle brackets (RFC 5322 3.6.4); ids written
    without brackets (a common defect) are taken when they contain an '@'."""
    ids = [_WS.sub("", m) for m in _MSG_ID.findall(value)]
    ids = [i for i in ids if i]
    if not ids and "<" not in value:
        ids = [tok for tok in re.split(r"[\s,]+", value) if "@" in tok]
    return ids[:MAX_IDS]


def _id_header(part: Message, name: str, ctx: _Context) -> list[str]:
    out: list[str] = []
    for value in _raw_values(part, name, ctx):
        out.extend(_msg_ids(value))
    return out[:MAX_IDS]


def _message_id(part: Message, ctx: _Context) -> str:
    value = _first_raw(part, "Message-ID", ctx)
    if value is None:
        return ""
    ids = _msg_ids(value)
    if ids:
        return ids[0]
    token = value.strip().split()
    if token:
        ctx.warn("Message-ID: not in <id@host> form")
        return token[0]
    return ""


def _date(part: Message, ctx: _Context) -> datetime | None:
    value = _first_raw(part, "Date", ctx)
    if value is None or not value.strip():
        return None
    try:
        fields = parsedate_tz(value)
        if fields is None:
            raise ValueError("unparseable")
        offset = fields[9] or 0
        stamp = datetime(*fields[:6], tzinfo=timezone(timedelta(seconds=offset)))
        return stamp.astimezone(UTC)
    except Exception:
        ctx.warn(f"Date: invalid value {value[:80]!r}")
        return None


def _list_id(part: Message, ctx: _Context) -> str:
    value = _first_raw(part, "List-Id", ctx)
    if not value:
        return ""
    value = _decode_words(value)
    match = _LIST_ID.search(value)
    return (match.group(1) if match else value).strip()


def _auto_submitted(part: Message, ctx: _Context) -> bool:
    """RFC 3834 5: Auto-Submitted other than "no"; or Precedence bulk/list/junk."""
    auto = _first_raw(part, "Auto-Submitted", ctx)
    if auto is not None and auto.split(";")[0].strip().lower() not in ("", "no"):
        return True
    precedence = _first_raw(part, "Precedence", ctx)
    return precedence is not None and precedence.strip().lower() in ("bulk", "list", "junk")


# --------------------------------------------------------------------------- parts


@dataclass
class _Leaf:
    part_id: str
    part: Message
    in_alternative: bool


def _children(part: Message) -> list[Message]:
    payload = part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    return []


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "application/octet-stream"


def _walk(msg: Message, ctx: _Context) -> Iterator[_Leaf]:
    """Leaf parts in document order with their IMAP part ids. message/* parts are leaves."""
    count = 0
    stack: list[tuple[Message, str, int, bool]] = [(msg, "", 0, False)]
    while stack:
        part, pid, depth, in_alt = stack.pop()
        ctype = ctx.content_type(part)
        maintype = ctype.split("/")[0]
        kids = _children(part) if maintype == "multipart" else []
        if maintype == "multipart" and kids:
            if depth >= MAX_DEPTH:
                ctx.warn(f"MIME nesting deeper than {MAX_DEPTH}; inner parts skipped")
                continue
            alt = in_alt or ctype == "multipart/alternative"
            for index in range(len(kids), 0, -1):
                child_id = f"{pid}.{index}" if pid else str(index)
                stack.append((kids[index - 1], child_id, depth + 1, alt))
            continue
        count += 1
        if count > MAX_PARTS:
            ctx.warn(f"more than {MAX_PARTS} MIME parts; the rest are skipped")
            return
        yield _Leaf(part_id=pid or "1", part=part, in_alternative=in_alt)


# A Content-Type / Content-Disposition of tokens and plain quoted strings (no RFC 2231 "*",
# no encoded words, no comments, no escapes, ASCII): most of them, read without the slow
# structured parser, with the same result.
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_PLAIN_PARAM = rf"""[A-Za-z0-9!#$%&'+.^_`|~-]+[ \t]*=[ \t]*(?:{_TOKEN}|"(?:[^"\\\r\n=]|=(?!\?))*")"""
_PLAIN_PARAMS = re.compile(rf"[ \t]*(?P<main>{_TOKEN}(?:/{_TOKEN})?)[ \t]*(?P<params>(?:;[ \t]*{_PLAIN_PARAM}[ \t]*)*);?[ \t]*")
_ONE_PARAM = re.compile(rf"""([A-Za-z0-9!#$%&'+.^_`|~-]+)[ \t]*=[ \t]*(?:({_TOKEN})|"([^"]*)")""")


def _plain_params(name: str, value: str) -> tuple[str, dict[str, str]] | None:
    m = _PLAIN_PARAMS.fullmatch(value.replace("\r\n", "").replace("\n", "") if "\n" in value else value)
    if m is None:
        return None
    main = m.group("main").lower()
    if ("/" in main) != (name.lower() == "content-type"):
        return None  # e.g. a type without a subtype: the structured parser's defaults apply
    params = {k.lower(): tok if tok else quoted for k, tok, quoted in _ONE_PARAM.findall(m.group("params"))}
    return main, params


def _params(part: Message, name: str, ctx: _Context) -> tuple[str, dict[str, str]]:
    """(lowercased value, params) of a Content-Type / Content-Disposition header."""
    value = _first_raw(part, name, ctx)
    if value is None:
        return "", {}
    plain = _plain_params(name, value)
    if plain is not None:
        return plain
    header = _header_obj(name, value, ctx, report=False)
    main = ""
    params: dict[str, str] = {}
    try:
        if header is not None:
            main = str(getattr(header, "content_disposition", None)
                       or getattr(header, "content_type", None) or "")
            params = {str(k).lower(): str(v) for k, v in header.params.items()}
    except Exception:
        header = None
    if header is None:
        main = value.split(";")[0].strip().lower()
        try:
            for key, val in part.get_params(header=name, failobj=[])[1:]:
                params[str(key).lower()] = _decode_words(str(collapse_rfc2231_value(val)))
        except Exception:
            pass
    for key in ("filename", "name"):
        # Unquoted values with spaces or encoded words ("name=My file.pdf",
        # "filename==?utf-8?B?...?="): the structured parser keeps only the first token.
        match = re.search(rf"(?:^|;)\s*{key}\s*=\s*([^\s\";][^;]*)", value, re.IGNORECASE)
        if match:
            unquoted = match.group(1).strip()
            if " " in unquoted or "=?" in unquoted:
                params[key] = _decode_words(unquoted)
    return main.lower(), {k: _fix_8bit(v, name, ctx) for k, v in params.items()}


def _clean_filename(name: str) -> str:
    name = _decode_words(name) if "=?" in name else name
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch >= " " and ch != "\x7f")
    return name.strip()[:255]


def _sub_message_subject(part: Message) -> str:
    """Subject of an attached message (its own problems are not the outer message's)."""
    kids = _children(part)
    if not kids:
        return ""
    return _clean_name(_text_header(kids[0], "Subject", _Context()))


def _serialize_body(part: Message) -> bytes:
    """The body of a message/* part as octets: the embedded message or report fields."""
    buf = io.BytesIO()
    generator: Any = BytesGenerator(buf, mangle_from_=False, policy=_GEN_POLICY)
    generator.flatten(part)
    data = buf.getvalue()
    cut = data.find(b"\r\n\r\n")
    return data[cut + 4 :] if cut >= 0 else b""


def _decoded_bytes(part: Message, ctx: _Context, where: str) -> bytes:
    try:
        if ctx.content_type(part).startswith("message/") or part.is_multipart():
            return _serialize_body(part)
        payload = part.get_payload(decode=True)
    except Exception as exc:
        ctx.warn(f"part {where}: body could not be decoded ({type(exc).__name__})")
        try:
            raw = part.get_payload()
            return raw.encode("ascii", "surrogateescape") if isinstance(raw, str) else b""
        except Exception:
            return b""
    if isinstance(payload, bytes):
        return payload
    return b""


def _codec(charset: str) -> str | None:
    label = charset.strip().strip("\"'").lower()
    label = _CHARSET_ALIASES.get(label, label)
    if not label or label in _NO_CHARSET:
        return None
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def _decode_text(data: bytes, charset: str, ctx: _Context, where: str) -> str:
    """Text of a body part: the declared charset, else UTF-8, else windows-1252."""
    codec = _codec(charset) if charset else "ascii"
    if charset and codec is None:
        ctx.warn(f"part {where}: unknown charset {charset[:40]!r}")
    if codec is not None:
        try:
            return data.decode(codec)
        except (UnicodeError, LookupError, ValueError):
            pass
        except Exception:
            pass
    try:
        text = data.decode("utf-8")
        if codec is not None and codec != "ascii":
            ctx.warn(f"part {where}: not valid {charset[:40]}; decoded as UTF-8")
        return text
    except UnicodeDecodeError:
        pass
    if codec is not None:
        ctx.warn(f"part {where}: not valid {charset[:40] or 'us-ascii'}; some characters replaced")
        try:
            return data.decode(codec, "replace")
        except Exception:
            pass
    return data.decode("cp1252", "replace")


def _part_text(part: Message, ctx: _Context, where: str) -> str:
    data = _decoded_bytes(part, ctx, where)
    try:
        charset = part.get_content_charset() or ""
    except Exception:
        charset = ""
    text = _decode_text(data, charset, ctx, where)
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


@dataclass
class _PartFacts:
    content_type: str
    disposition: str
    filename: str
    content_id: str


def _facts(part: Message, ctx: _Context) -> _PartFacts:
    ctype = ctx.content_type(part)
    disposition, dparams = _params(part, "Content-Disposition", ctx)
    _, cparams = _params(part, "Content-Type", ctx)
    filename = dparams.get("filename") or cparams.get("name") or ""
    filename = _clean_filename(filename) if filename else ""
    cid_raw = _first_raw(part, "Content-ID", ctx) or ""
    cid = cid_raw.strip()
    if cid.startswith("<") and cid.endswith(">"):
        cid = cid[1:-1].strip()
    return _PartFacts(ctype, disposition, filename, cid)


def _info(leaf: _Leaf, facts: _PartFacts, size: int, ctx: _Context) -> AttachmentInfo:
    filename = facts.filename
    if not filename and facts.content_type == "message/rfc822":
        subject = _sub_message_subject(leaf.part)
        filename = _clean_filename(subject or "message")[:200] + ".eml"
    inline = facts.disposition == "inline" or (not facts.disposition and bool(facts.content_id))
    return AttachmentInfo(
        part_id=leaf.part_id,
        filename=filename,
        content_type=facts.content_type,
        size=size,
        content_id=facts.content_id,
        inline=inline,
    )


# --------------------------------------------------------------------------- snippet


def _snippet_source(text: str) -> str:
    """Text minus quoted lines, attribution lines and the signature, when anything is left."""
    lines = text.split("\n")
    kept: list[str] = []
    words = 0  # characters of the kept lines' words (with a separator each): the snippet
    # needs only its first SNIPPET_CHARS, so lines after that many are not looked at
    for i, line in enumerate(lines):
        if words > SNIPPET_CHARS:
            break
        stripped = line.strip()
        if line.rstrip() == "--":  # RFC 3676 4.3 signature separator "-- "
            break
        if stripped.startswith(">"):
            continue
        if stripped.endswith(("wrote:", "writes:", "schrieb:", "a écrit :", "a écrit:")):
            following = next((n.strip() for n in lines[i + 1 :] if n.strip()), "")
            if following.startswith(">"):
                continue
        kept.append(line)
        for word in line.split():
            words += len(word) + 1
    result = " ".join(kept).strip()
    return result or text


def _make_snippet(text: str, html: str) -> str:
    source = _snippet_source(text[:SNIPPET_HTML_CHARS]) if text.strip() else ""
    if not source and html:
        source = _snippet_source(html_to_text(html[:SNIPPET_HTML_CHARS], max_chars=20_000))
    collapsed = " ".join(source.split())
    if len(collapsed) <= SNIPPET_CHARS:
        return collapsed
    return collapsed[:SNIPPET_CHARS].rstrip()


# --------------------------------------------------------------------------- entry points


def _parse_single_part(raw: bytes) -> Message | None:
    """The feed parser's result for a single-part message without reading its body line by
    line (most of its work on such mail), or None when the message may not be single-part
    or its header section is anything but plain (the full parse then runs). The feed parser
    sets the rest of the input after the blank line as the payload of a non-multipart,
    non-message/* part; a header section that ends at that blank line parses the same alone."""
    ends = [(i, n) for i, n in ((raw.find(b"\r\n\r\n"), 4), (raw.find(b"\n\n"), 2)) if i >= 0]
    if not ends:
        return None
    i, n = min(ends)
    cut = i + n
    head = raw[:cut]
    lowered = head.lower()
    if b"multipart" in lowered or b"message/" in lowered:
        return None
    msg = BytesParser(policy=_STRUCTURE_POLICY).parsebytes(head, headersonly=True)
    # defects, or header lines left over as payload: the parser did not end the header
    # section at that blank line
    if msg.defects or msg.get_payload() != "" or msg.get_content_maintype() in ("multipart", "message"):
        return None
    msg.set_payload(raw[cut:].decode("ascii", "surrogateescape"))
    return msg


def _parse_bytes(raw: bytes, ctx: _Context) -> Message | None:
    try:
        fast = _parse_single_part(raw)
        if fast is not None:
            return fast
    except Exception:
        pass  # the full parse below reports it
    try:
        return BytesParser(policy=_STRUCTURE_POLICY).parsebytes(raw)
    except Exception as exc:
        ctx.warn(f"message structure could not be parsed ({type(exc).__name__})")
    try:
        return BytesParser(policy=_STRUCTURE_POLICY).parsebytes(raw, headersonly=True)
    except Exception:
        return None


def _fill_headers(out: ParsedMessage, msg: Message, ctx: _Context) -> None:
    out.subject = _clean_name(_text_header(msg, "Subject", ctx))
    out.from_ = _addresses(msg, "From", ctx)
    senders = _addresses(msg, "Sender", ctx)
    out.sender = senders[0] if senders else None
    out.reply_to = _addresses(msg, "Reply-To", ctx)
    out.to = _addresses(msg, "To", ctx)
    out.cc = _addresses(msg, "Cc", ctx)
    out.bcc = _addresses(msg, "Bcc", ctx)
    out.date = _date(msg, ctx)
    out.message_id = _message_id(msg, ctx)
    out.in_reply_to = _id_header(msg, "In-Reply-To", ctx)
    out.references = _id_header(msg, "References", ctx)
    out.list_id = _list_id(msg, ctx)
    out.auto_submitted = _auto_submitted(msg, ctx)


def _fill_body(out: ParsedMessage, msg: Message, ctx: _Context, max_chars: int) -> None:
    text_parts: list[str] = []
    text_chars = 0
    reported = len(msg.defects)
    html: str | None = None
    for leaf in _walk(msg, ctx):
        part = leaf.part
        where = leaf.part_id
        try:
            facts = _facts(part, ctx)
            ctype = facts.content_type
            maintype = ctype.split("/")[0]
            if maintype == "multipart":
                # a multipart whose boundary is missing or never appears: show its text
                ctx.warn(f"part {where}: {ctype} without usable parts; read as text")
                ctype = "text/plain"
            attached = facts.disposition == "attachment"
            is_body_type = ctype in ("text/plain", "text/html")
            if is_body_type and not attached:
                if ctype == "text/plain" and not text_parts:
                    text_parts.append(_part_text(part, ctx, where))
                    text_chars += len(text_parts[-1])
                    continue
                if ctype == "text/html" and html is None:
                    html = _part_text(part, ctx, where)
                    continue
                if ctype == "text/plain" and not facts.filename and not leaf.in_alternative:
                    # e.g. a list footer after the body in multipart/mixed
                    if text_chars < max_chars:
                        text_parts.append(_part_text(part, ctx, where))
                        text_chars += len(text_parts[-1])
                    continue
                if not facts.filename:
                    continue  # another alternative of the body; not an attachment
            data = _decoded_bytes(part, ctx, where)
            info = _info(leaf, facts, len(data), ctx)
            out.attachments.append(info)
            if attached or facts.filename or ctype == "message/rfc822":
                out.has_attachments = True
        except Exception as exc:  # one bad part must not lose the others
            ctx.warn(f"part {where}: skipped ({type(exc).__name__})")
        finally:
            # after decoding, which adds base64 defects; the root's own were reported already
            ctx.defects(f"part {where}", part.defects[reported if part is msg else 0 :])
    text = "\n".join(text_parts)
    if len(text) > max_chars:
        ctx.warn(f"text body truncated to {max_chars} characters")
        text = text[:max_chars]
    html_text = html or ""
    if len(html_text) > max_chars:
        ctx.warn(f"HTML body truncated to {max_chars} characters")
        html_text = html_text[:max_chars]
    out.text_body = text
    out.html_body = html_text


def parse_message(raw: bytes, *, max_body_chars: int = 1_000_000) -> ParsedMessage:
    """Parse one raw message. Never raises: problems end up in parse_warnings."""
    ctx = _Context()
    out = ParsedMessage()
    try:
        raw = bytes(raw)
    except Exception:
        out.parse_warnings = ["input is not bytes"]
        return out
    out.size = len(raw)
    if not raw.strip():
        ctx.warn("message is empty")
    out.headers_size = _headers_size(raw)
    max_chars = max(0, int(max_body_chars))
    msg = _parse_bytes(raw, ctx)
    if msg is None:
        out.parse_warnings = ctx.items
        return out
    ctx.defects("message", msg.defects)
    try:
        _fill_headers(out, msg, ctx)
    except Exception as exc:
        ctx.warn(f"headers could not be read ({type(exc).__name__})")
    try:
        _fill_body(out, msg, ctx, max_chars)
    except Exception as exc:
        ctx.warn(f"body could not be read ({type(exc).__name__})")
    try:
        out.snippet = _make_snippet(out.text_body, out.html_body)
    except Exception:
        out.snippet = ""
    out.parse_warnings = ctx.items
    return out


def get_attachment(raw: bytes, part_id: str) -> tuple[AttachmentInfo, bytes]:
    """The AttachmentInfo and decoded octets of the leaf part part_id; NotFound if none.

    Any leaf part can be fetched, body parts included. A message/* part comes back as the
    embedded message, its header lines as received, with CRLF line endings.
    """
    if not isinstance(part_id, str) or not re.fullmatch(r"[1-9][0-9]{0,5}(\.[1-9][0-9]{0,5})*",
                                                          part_id):
        raise NotFound(f"no MIME part {str(part_id)[:40]!r} in this message")
    ctx = _Context()
    try:
        msg = _parse_bytes(bytes(raw), ctx)
    except Exception:
        msg = None
    if msg is not None:
        try:
            for leaf in _walk(msg, ctx):
                if leaf.part_id != part_id:
                    continue
                facts = _facts(leaf.part, ctx)
                data = _decoded_bytes(leaf.part, ctx, part_id)
                return _info(leaf, facts, len(data), ctx), data
        except Exception:
            pass
    raise NotFound(f"no MIME part {part_id!r} in this message")
