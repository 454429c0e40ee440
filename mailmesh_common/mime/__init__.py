"""MIME: parsing raw messages, HTML to text, and the keys messages are threaded by."""

from mailmesh_common.address import MailAddress
from mailmesh_common.mime.html import html_to_text
from mailmesh_common.mime.parse import AttachmentInfo, ParsedMessage, get_attachment, parse_message
from mailmesh_common.mime.threading import (
    is_reply_subject,
    normalize_subject,
    participants,
    reference_chain,
)

__all__ = [
    "AttachmentInfo",
    "MailAddress",
    "ParsedMessage",
    "get_attachment",
    "html_to_text",
    "is_reply_subject",
    "normalize_subject",
    "parse_message",
    "participants",
    "reference_chain",
]
