"""The search document of one message: what svc_search knows about it, built from the
mailbox's Message (FULL format), and its serialized form stored with it in every backend.

A document holds the user id, message and thread ids, the From/To/Cc/Bcc addresses and names,
the subject, the body text (the text part, or the HTML part converted to text; quoted replies
are kept), attachment file names, labels, the internal date, the size, and the has-attachment,
unread and starred states, plus the MODSEQ of the change it reflects (so stale or repeated
events never overwrite newer state).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from mailmesh.v1 import types_pb2

from mailmesh_common.mime import ParsedMessage, html_to_text

# The body text indexed per message; longer bodies are searched in their first MAX_BODY_CHARS.
MAX_BODY_CHARS = 200_000
MAX_SUBJECT_CHARS = 2_000
MAX_ADDRESSES = 200
MAX_FILENAMES = 200
# Internal dates are clamped into [0, MAX_DATE] so that the sort key fits an unsigned 64-bit field.
MAX_DATE = 17_000_000_000
TIE_MOD = 1_000_000_000

TEXT_FIELDS = ("from", "to", "cc", "bcc", "subject", "body", "filename")

Addr = tuple[str, str]  # (display name, address)


def tie_of(message_id: str) -> int:
    """A stable number in [0, TIE_MOD) that orders messages received in the same second."""
    return int.from_bytes(hashlib.sha256(message_id.encode()).digest()[:8], "big") % TIE_MOD


@dataclass(frozen=True)
class SearchDocument:
    user: str
    message_id: str
    thread_id: str = ""
    from_: tuple[Addr, ...] = ()
    to: tuple[Addr, ...] = ()
    cc: tuple[Addr, ...] = ()
    bcc: tuple[Addr, ...] = ()
    subject: str = ""
    body: str = ""
    filenames: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    date: int = 0  # internal date, seconds since the epoch
    size: int = 0
    has_attachment: bool = False
    unread: bool = False
    starred: bool = False
    modseq: int = 0
    generation: int = 0  # the reindex that wrote it (0: the indexer)
    _texts: dict[str, str] | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.user, self.message_id)

    @property
    def tie(self) -> int:
        return tie_of(self.message_id)

    @property
    def sort_key(self) -> tuple[int, int]:
        """Newest-first order: (date, tie), larger first."""
        return (self.date, self.tie)

    def text(self, name: str) -> str:
        """The text of one of TEXT_FIELDS, as it is indexed."""
        if self._texts is None:
            object.__setattr__(self, "_texts", {
                "from": addresses_text(self.from_), "to": addresses_text(self.to),
                "cc": addresses_text(self.cc), "bcc": addresses_text(self.bcc),
                "subject": self.subject, "body": self.body, "filename": "\n".join(self.filenames)})
        assert self._texts is not None
        return self._texts[name]

    def with_state(self, *, labels: Sequence[str], unread: bool, starred: bool, modseq: int,
                   thread_id: str = "") -> SearchDocument:
        return replace(self, labels=tuple(labels), unread=unread, starred=starred, modseq=modseq,
                       thread_id=thread_id or self.thread_id)

    # --- stored form ------------------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        d.pop("_texts")
        d["from"] = d.pop("from_")
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False)

    def to_bytes(self) -> bytes:
        return self.to_json().encode()  # the backends compress their stores themselves

    @classmethod
    def from_json(cls, data: str | bytes) -> SearchDocument:
        d = json.loads(data)
        return cls(
            user=d["user"], message_id=d["message_id"], thread_id=d.get("thread_id", ""),
            from_=_addrs(d.get("from", ())), to=_addrs(d.get("to", ())), cc=_addrs(d.get("cc", ())),
            bcc=_addrs(d.get("bcc", ())), subject=d.get("subject", ""), body=d.get("body", ""),
            filenames=tuple(d.get("filenames", ())), labels=tuple(d.get("labels", ())),
            date=int(d.get("date", 0)), size=int(d.get("size", 0)),
            has_attachment=bool(d.get("has_attachment")), unread=bool(d.get("unread")),
            starred=bool(d.get("starred")), modseq=int(d.get("modseq", 0)),
            generation=int(d.get("generation", 0)))

    @classmethod
    def from_bytes(cls, data: bytes) -> SearchDocument:
        return cls.from_json(data)


def _addrs(raw: object) -> tuple[Addr, ...]:
    out: list[Addr] = []
    for item in raw if isinstance(raw, (list, tuple)) else ():
        if isinstance(item, (list, tuple)) and len(item) == 2:
            out.append((str(item[0]), str(item[1])))
    return tuple(out)


def addresses_text(addrs: Sequence[Addr]) -> str:
    """Names and addresses as one text: "Alice Smith alice@example.com\\nBob bob@example.org"."""
    return "\n".join(f"{name} {email}".strip() for name, email in addrs)


def body_text(text_body: str, html_body: str) -> str:
    """The text of a message body: its text part, or its HTML part converted to text."""
    if text_body.strip():
        return text_body[:MAX_BODY_CHARS]
    if html_body:
        return html_to_text(html_body[: MAX_BODY_CHARS * 5])[:MAX_BODY_CHARS]
    return ""


def _pb_addrs(items: Sequence[types_pb2.Address]) -> tuple[Addr, ...]:
    return tuple((a.name, a.email) for a in list(items)[:MAX_ADDRESSES])


def from_message(user: str, m: types_pb2.Message) -> SearchDocument:
    """The document of a mailbox message read in FULL format."""
    names = tuple(a.filename for a in m.attachments if a.filename)[:MAX_FILENAMES]
    date = max(0, min(MAX_DATE, m.internal_date.seconds))
    return SearchDocument(
        user=user, message_id=m.id, thread_id=m.thread_id, from_=_pb_addrs(getattr(m, "from")),
        to=_pb_addrs(m.to), cc=_pb_addrs(m.cc), bcc=_pb_addrs(m.bcc),
        subject=m.subject[:MAX_SUBJECT_CHARS], body=body_text(m.text_body, m.html_body),
        filenames=names, labels=tuple(dict.fromkeys(m.label_ids)), date=date, size=max(0, m.size_estimate),
        has_attachment=m.has_attachments,
        unread=m.unread, starred=m.starred or "STARRED" in m.label_ids, modseq=m.history_id)


def fill_full(m: types_pb2.Message, parsed: ParsedMessage) -> types_pb2.Message:
    """A stored message record completed with the bodies and attachments of its parsed raw
    message: the FULL format, as the mailbox builds it."""
    full = types_pb2.Message()
    full.CopyFrom(m)
    full.text_body = parsed.text_body
    full.html_body = parsed.html_body
    del full.attachments[:]
    for a in parsed.attachments:
        full.attachments.add(attachment_id=a.part_id, filename=a.filename, mime_type=a.content_type,
                             size=a.size, content_id=a.content_id, inline=a.inline)
    return full
