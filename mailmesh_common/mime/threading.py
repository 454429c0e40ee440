"""Threading keys: normalized subjects, candidate parent ids and participants.

DESIGN.md (State, Threading): References (newest ancestor first) and In-Reply-To, then the
normalized subject within 30 days with two participants in common. These pure functions give
the mailbox service its keys; the decision itself lives in svc_mailbox/threads.py.
"""

from __future__ import annotations

import re
import unicodedata

from mailmesh_common.address import canonical
from mailmesh_common.errors import InvalidInput
from mailmesh_common.mime.parse import ParsedMessage

__all__ = ["is_reply_subject", "normalize_subject", "participants", "reference_chain"]

MAX_SUBJECT_CHARS = 2000

# Reply prefixes in the languages mail clients localize them to (RFC 5322 3.6.5 names "Re:").
_REPLY_WORDS = (
    "re", "aw", "sv", "vs", "antw", "antwort", "réf", "rif", "odp", "ynt", "atb", "vá", "svar",
    "απ", "σχετ", "回复", "回覆", "答复",
)
# Forward prefixes.
_FORWARD_WORDS = (
    "fwd", "fw", "wg", "tr", "rv", "enc", "doorst", "trs", "vl", "fs", "πρθ", "转发", "轉寄",
)


def _alternation(words: tuple[str, ...]) -> str:
    ordered = sorted(set(words), key=len, reverse=True)
    return "|".join(re.escape(w) for w in ordered)


# "Re:", "RE :", "Re[2]:", "Re(2):", "Re：" (full-width colon); case-insensitive.
_COUNTER = r"(?:\s*\[\d{1,4}\]|\s*\(\d{1,4}\))?"
_REPLY_PREFIX = re.compile(
    rf"(?:{_alternation(_REPLY_WORDS)}){_COUNTER}\s*[:：]\s*", re.IGNORECASE
)
_ANY_PREFIX = re.compile(
    rf"(?:{_alternation(_REPLY_WORDS + _FORWARD_WORDS)}){_COUNTER}\s*[:：]\s*", re.IGNORECASE
)
# A mailing-list tag: one bracketed token such as "[jailhouse-dev]" or "[siemens/jailhouse]".
# Patch markers ("[PATCH v2 1/3]", "[RFC]", "[PULL]") are part of the subject, not a tag.
_LIST_TAG = re.compile(r"\[(?!(?:patch|rfc|pull|git)\b)[^\[\]\s]{1,64}\]\s*", re.IGNORECASE)


def _strip_prefixes(subject: str) -> tuple[str, bool]:
    """(subject without leading reply/forward prefixes and list tags, saw a reply prefix)."""
    text = subject.strip()
    replied = False
    while text:
        match = _REPLY_PREFIX.match(text)
        if match:
            replied = True
            text = text[match.end():]
            continue
        match = _ANY_PREFIX.match(text) or _LIST_TAG.match(text)
        if match:
            text = text[match.end():]
            continue
        break
    return text, replied


def normalize_subject(subject: str) -> str:
    """Subject key for threading: reply/forward prefixes (Re:, Fwd:, AW:, SV:, Re[2]: ...) and
    list tags stripped from the start, whitespace collapsed, casefolded. "" stays ""."""
    if not subject:
        return ""
    text = unicodedata.normalize("NFC", subject[:MAX_SUBJECT_CHARS])
    text = " ".join(text.split())
    text, _ = _strip_prefixes(text)
    return " ".join(text.split()).casefold()


def is_reply_subject(subject: str) -> bool:
    """True if the subject starts (after any list tags or forward prefixes) with a reply
    prefix such as Re:, AW:, SV: or Réf:."""
    if not subject:
        return False
    text = " ".join(unicodedata.normalize("NFC", subject[:MAX_SUBJECT_CHARS]).split())
    return _strip_prefixes(text)[1]


def reference_chain(parsed: ParsedMessage) -> list[str]:
    """Candidate parent ids, newest ancestor first: In-Reply-To (last id first), then
    References from last to first; deduplicated, without the message's own id."""
    chain: list[str] = []
    seen = {parsed.message_id} if parsed.message_id else set()
    for msg_id in [*reversed(parsed.in_reply_to), *reversed(parsed.references)]:
        if msg_id and msg_id not in seen:
            seen.add(msg_id)
            chain.append(msg_id)
    return chain


def _key(email: str) -> str:
    try:
        return canonical(email)
    except InvalidInput:
        return email.strip().strip("<>").strip().lower()


def participants(parsed: ParsedMessage) -> set[str]:
    """Canonical addresses in From, Sender, Reply-To, To and Cc."""
    found: set[str] = set()
    addresses = [*parsed.from_, *parsed.reply_to, *parsed.to, *parsed.cc]
    if parsed.sender is not None:
        addresses.append(parsed.sender)
    for address in addresses:
        key = _key(address.email)
        if key:
            found.add(key)
    return found
