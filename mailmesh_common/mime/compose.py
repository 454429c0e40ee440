"""Building outgoing messages (RFC 5322, MIME) with the standard library's EmailMessage, and the
byte-level header edits shared with SMTP submission. Pure functions, no I/O.

`compose` gives two serializations of one message: the SENT copy, which keeps Bcc (like
Gmail, the sender sees whom they blind-copied), and the delivery copy without it (RFC 5322
3.6.3: Bcc recipients are not disclosed). Both share Message-ID, Date and MIME boundaries.
"""

from __future__ import annotations

import mimetypes
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email import policy as email_policy
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.utils import format_datetime

from mailmesh.v1 import types_pb2

from mailmesh_common.address import MailAddress, parse_address
from mailmesh_common.errors import InvalidInput
from mailmesh_common.mime import html_to_text, is_reply_subject

MAX_SUBJECT_CHARS = 2000
MAX_REFERENCES = 50  # References of a reply: the root and the newest ancestors (RFC 5322 3.6.4)
MAX_ATTACHMENTS = 100
_MIME_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")
_CID = re.compile(r"^[\x21-\x7e]{1,250}$")


@dataclass(frozen=True)
class AttachmentIn:
    """An attachment as the caller gave it."""

    filename: str
    data: bytes
    mime_type: str = ""
    content_id: str = ""
    inline: bool = False


@dataclass
class Draft:
    """Everything a new message is made of."""

    sender: MailAddress  # From: display name and sending address
    to: list[MailAddress] = field(default_factory=list)
    cc: list[MailAddress] = field(default_factory=list)
    bcc: list[MailAddress] = field(default_factory=list)
    reply_to: list[MailAddress] = field(default_factory=list)
    subject: str = ""
    text: str = ""
    html: str = ""
    attachments: list[AttachmentIn] = field(default_factory=list)
    parent: types_pb2.Message | None = None  # the message replied to (METADATA)


@dataclass(frozen=True)
class Composed:
    """The two serializations of a composed message (CRLF line ends)."""

    sent_raw: bytes  # with Bcc
    delivery_raw: bytes  # without Bcc
    message_id: str  # without angle brackets
    subject: str


def new_message_id(domain: str) -> str:
    """A globally unique Message-ID on the sender's domain (RFC 5322 3.6.4), without brackets."""
    return f"{uuid.uuid4().hex}@{domain}"


def mail_address(name: str, email: str, *, field_name: str) -> MailAddress:
    """A validated MailAddress from an API Address."""
    if any(c in name for c in "\r\n\x00"):
        raise InvalidInput(f"{field_name}: a display name may not contain line breaks")
    try:
        parsed = parse_address(email.strip())
    except InvalidInput as exc:
        raise InvalidInput(f"{field_name}: {exc.message}") from None
    return MailAddress(name=" ".join(name.split())[:300], email=parsed.email)


def _header_address(a: MailAddress) -> HeaderAddress:
    local, _, domain = a.email.rpartition("@")
    return HeaderAddress(display_name=a.name, username=local, domain=domain)


def _check_text(value: str, what: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidInput(f"{what} is longer than {limit} characters")
    if any(c in value for c in "\r\n\x00"):
        raise InvalidInput(f"{what} may not contain line breaks")
    return value


def reply_subject(parent_subject: str) -> str:
    """ "Re: <subject>", unless it already is a reply subject."""
    subject = parent_subject.strip()
    return subject if is_reply_subject(subject) else f"Re: {subject}".strip()


def thread_headers(parent: types_pb2.Message) -> tuple[str, str]:
    """(In-Reply-To, References) values for a reply to parent (RFC 5322 3.6.4)."""
    if not parent.message_id_header:
        return "", ""
    refs = [r for r in parent.references if r] or list(parent.in_reply_to[-1:])
    if len(refs) > MAX_REFERENCES - 1:
        refs = refs[:1] + refs[-(MAX_REFERENCES - 2):]  # keep the root
    chain = [*refs, parent.message_id_header]
    return f"<{parent.message_id_header}>", " ".join(f"<{r}>" for r in chain)


# the leading bytes of common formats, for files whose name says nothing (no or an unknown extension)
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "application/pdf"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"PK\x03\x04", "application/zip"),
    (b"\x1f\x8b", "application/gzip"), (b"%!PS", "application/postscript"), (b"BEGIN:VCALENDAR", "text/calendar"),
    (b"BEGIN:VCARD", "text/vcard"), (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
)


def sniff_type(data: bytes) -> str:
    """The MIME type the first bytes of a file show (RIFF/WEBP and text included), else ""."""
    for magic, mime_type in _MAGIC:
        if data.startswith(magic):
            return mime_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    head = data[:4096]
    if head and b"\x00" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 3:  # not just a character cut at the 4096th byte
                return ""
        return "text/plain"
    return ""


def _guess_type(filename: str, given: str, data: bytes = b"") -> tuple[str, str]:
    mime_type = given.strip().lower()
    if mime_type:
        if not _MIME_TYPE.match(mime_type):
            raise InvalidInput(f"attachment {filename!r}: mime_type {given!r} is not type/subtype")
    else:
        mime_type = (mimetypes.guess_type(filename, strict=False)[0] or sniff_type(data)
                     or "application/octet-stream")
    maintype, _, subtype = mime_type.partition("/")
    return maintype, subtype


def _clean_filename(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c >= " " and c != "\x7f").strip()
    if not base:
        raise InvalidInput("every attachment needs a file name")
    return base[:255]


def _needs_utf8(addresses: Sequence[MailAddress]) -> bool:
    return any(not a.email.rpartition("@")[0].isascii() for a in addresses)


def compose(draft: Draft, *, message_id: str, date: datetime) -> Composed:
    """Builds the message; InvalidInput names what is wrong with the draft."""
    subject = draft.subject
    if not subject and draft.parent is not None:
        subject = reply_subject(draft.parent.subject)
    subject = _check_text(subject, "subject", MAX_SUBJECT_CHARS)
    if len(draft.attachments) > MAX_ATTACHMENTS:
        raise InvalidInput(f"at most {MAX_ATTACHMENTS} attachments")
    everyone = [draft.sender, *draft.to, *draft.cc, *draft.bcc, *draft.reply_to]
    policy = email_policy.SMTPUTF8 if _needs_utf8(everyone) else email_policy.SMTP

    msg = EmailMessage(policy=policy)
    msg["From"] = _header_address(draft.sender)
    if draft.to:
        msg["To"] = [_header_address(a) for a in draft.to]
    if draft.cc:
        msg["Cc"] = [_header_address(a) for a in draft.cc]
    if draft.reply_to:
        msg["Reply-To"] = [_header_address(a) for a in draft.reply_to]
    msg["Subject"] = subject
    msg["Date"] = format_datetime(date)
    msg["Message-ID"] = f"<{message_id}>"
    if draft.parent is not None:
        in_reply_to, references = thread_headers(draft.parent)
        if in_reply_to:
            msg["In-Reply-To"] = in_reply_to
            msg["References"] = references

    text, html = draft.text, draft.html
    if html and not text:
        text = html_to_text(html)
    msg.set_content(text or "", cte=None)
    if html:
        msg.add_alternative(html, subtype="html")
    for att in draft.attachments:
        filename = _clean_filename(att.filename)
        maintype, subtype = _guess_type(filename, att.mime_type, att.data)
        disposition = "inline" if att.inline else "attachment"
        headers: list[str] = []
        if att.content_id:
            cid = att.content_id.strip().strip("<>")
            if not _CID.match(cid):
                raise InvalidInput(f"attachment {filename!r}: content_id must be printable ASCII")
            headers.append(f"Content-ID: <{cid}>")
        params: dict[str, str] = {}
        if maintype == "text":
            try:
                att.data.decode("utf-8")
                params["charset"] = "utf-8"
            except UnicodeDecodeError:
                pass
        # as bytes (base64): the file arrives byte for byte, line ends included
        msg.add_attachment(att.data, maintype=maintype, subtype=subtype, filename=filename,
                           disposition=disposition, headers=headers, params=params)
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]  # EmailMessage puts it on every part; RFC 2045 4: top level only
    if draft.bcc:
        msg["Bcc"] = [_header_address(a) for a in draft.bcc]
    sent_raw = msg.as_bytes()
    # one serialization: the delivery copy is the same bytes without the Bcc field
    delivery_raw = remove_headers(sent_raw, ["Bcc"]) if draft.bcc else sent_raw
    return Composed(sent_raw, delivery_raw, message_id, subject)


# --- byte-level header edits (submitted messages are relayed as they came) ----------------------

def split_head(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(header block, separator, body). Line ends are kept as they are."""
    crlf, lf = raw.find(b"\r\n\r\n"), raw.find(b"\n\n")
    if crlf < 0 and lf < 0:
        return raw, b"", b""
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return raw[:crlf], b"\r\n\r\n", raw[crlf + 4:]
    return raw[:lf], b"\n\n", raw[lf + 2:]


def _fields(head: bytes) -> list[bytes]:
    """The header fields of a header block, each with its continuation lines."""
    fields: list[bytes] = []
    for line in re.split(rb"(?<=\n)", head):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def header_values(raw: bytes, name: str) -> list[str]:
    """The raw values of every `name` field (unfolded, decoded as UTF-8 with replacement)."""
    head, _, _ = split_head(raw)
    out = []
    key = name.lower().encode()
    for f in _fields(head + b"\n"):
        fname, colon, value = f.partition(b":")
        if colon and fname.strip().lower() == key:
            out.append(re.sub(rb"\r?\n[ \t]", b" ", value).strip().decode("utf-8", "replace"))
    return out


def remove_headers(raw: bytes, names: Sequence[str]) -> bytes:
    """raw without the named header fields (folded lines included); the rest is untouched."""
    head, sep, body = split_head(raw)
    drop = {n.lower().encode() for n in names}
    eol = b"\r\n" if sep == b"\r\n\r\n" or b"\r\n" in head else b"\n"
    kept = [f for f in _fields(head + eol) if f.partition(b":")[0].strip().lower() not in drop]
    new_head = b"".join(kept)
    if new_head.endswith(eol):
        new_head = new_head[:-len(eol)]
    return new_head + (sep or eol + eol) + body


def prepend_headers(raw: bytes, lines: Sequence[str]) -> bytes:
    """raw with header fields added on top (CRLF; each line given without its line end)."""
    return b"".join(line.encode("utf-8") + b"\r\n" for line in lines) + raw


def normalize_line_ends(raw: bytes) -> bytes:
    """CRLF everywhere (RFC 5322 2.1; what DKIM signs and SMTP sends)."""
    return re.sub(rb"\r?\n", b"\r\n", raw)


def received_header(hostname: str, *, protocol: str, send_id: str, date: datetime,
                    helo: str = "", client_ip: str = "") -> str:
    """The trace field a submission server adds (RFC 5321 4.4; protocol names RFC 3848)."""
    origin = ""
    if helo or client_ip:
        origin = f"from {helo or 'unknown'} ({f'[{client_ip}]' if client_ip else 'unknown'})\r\n\t"
    return f"Received: {origin}by {hostname} (mailmesh) with {protocol} id {send_id};\r\n\t{format_datetime(date)}"


__all__ = [
    "AttachmentIn", "Composed", "Draft", "compose", "header_values", "mail_address", "new_message_id",
    "normalize_line_ends", "prepend_headers", "received_header", "remove_headers", "reply_subject",
    "split_head", "thread_headers",
]
