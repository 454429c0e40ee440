"""Protobuf messages → JSON dicts of the REST API (the shapes in models.py), by hand for speed:
camelCase keys, int64 as strings, RFC 3339 timestamps, base64 bytes, enum value names."""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import search_service_pb2 as spb
from mailmesh.v1 import send_service_pb2, types_pb2

FORMATS: dict[str, types_pb2.MessageFormat.ValueType] = {"minimal": types_pb2.MESSAGE_FORMAT_MINIMAL, "metadata": types_pb2.MESSAGE_FORMAT_METADATA,
           "full": types_pb2.MESSAGE_FORMAT_FULL, "raw": types_pb2.MESSAGE_FORMAT_RAW}


def ts(t: Timestamp, present: bool = True) -> str | None:
    if not present or (t.seconds == 0 and t.nanos == 0):
        return None
    return t.ToJsonString()


def _addresses(items: Any) -> list[dict[str, str]]:
    return [{"name": a.name, "email": a.email} for a in items]


def message(m: types_pb2.Message, fmt: int = types_pb2.MESSAGE_FORMAT_MINIMAL) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": m.id, "threadId": m.thread_id, "labelIds": list(m.label_ids), "unread": m.unread,
        "starred": m.starred, "keywords": list(m.keywords), "snippet": m.snippet,
        "sizeEstimate": str(m.size_estimate), "historyId": str(m.history_id),
    }
    internal = ts(m.internal_date, m.HasField("internal_date"))
    if internal:
        out["internalDate"] = internal
    if fmt in (types_pb2.MESSAGE_FORMAT_METADATA, types_pb2.MESSAGE_FORMAT_FULL):
        out.update({
            "subject": m.subject, "from": _addresses(getattr(m, "from")),
            "to": _addresses(m.to), "cc": _addresses(m.cc), "bcc": _addresses(m.bcc),
            "replyTo": _addresses(m.reply_to), "messageIdHeader": m.message_id_header,
            "inReplyTo": list(m.in_reply_to), "references": list(m.references),
            "hasAttachments": m.has_attachments,
        })
        date = ts(m.date, m.HasField("date"))
        if date:
            out["date"] = date
        if m.recipients:
            out["recipients"] = [{"email": r.email, "state": types_pb2.RecipientState.Name(r.state),
                                  "lastReply": r.last_reply, "attempts": r.attempts,
                                  **({"updatedTime": u} if (u := ts(r.updated_time, r.HasField("updated_time")))
                                     else {})} for r in m.recipients]
    if fmt == types_pb2.MESSAGE_FORMAT_FULL:
        out["attachments"] = [{"attachmentId": a.attachment_id, "filename": a.filename, "mimeType": a.mime_type,
                               "size": str(a.size), "contentId": a.content_id, "inline": a.inline}
                              for a in m.attachments]
        out["textBody"] = m.text_body
        out["htmlBody"] = m.html_body
        if m.parse_warnings:
            out["parseWarnings"] = list(m.parse_warnings)
    if fmt == types_pb2.MESSAGE_FORMAT_RAW:
        out["raw"] = base64.b64encode(m.raw).decode()
    return out


def search_result(r: spb.SearchResult) -> dict[str, Any]:
    out: dict[str, Any] = {"id": r.message_id.rsplit("/", 1)[-1], "threadId": r.thread_id, "snippet": r.snippet}
    internal = ts(r.internal_date, r.HasField("internal_date"))
    if internal:
        out["internalDate"] = internal
    return out


def label(lb: types_pb2.Label) -> dict[str, Any]:
    return {"id": lb.id, "name": lb.name, "type": types_pb2.LabelType.Name(lb.type),
            "messagesTotal": str(lb.messages_total), "messagesUnread": str(lb.messages_unread),
            "threadsTotal": str(lb.threads_total)}


def thread(t: types_pb2.Thread, fmt: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": t.id, "snippet": t.snippet, "historyId": str(t.history_id),
                           "messageCount": t.message_count, "labelIds": list(t.label_ids), "unread": t.unread,
                           "subject": t.subject}
    last = ts(t.last_message_time, t.HasField("last_message_time"))
    if last:
        out["lastMessageTime"] = last
    if fmt is not None:
        out["messages"] = [message(m, fmt) for m in t.messages]
    return out


def profile(a: types_pb2.Account) -> dict[str, Any]:
    out: dict[str, Any] = {"userId": a.user_id, "emailAddress": a.email, "displayName": a.display_name,
                           "addresses": list(a.addresses), "messagesTotal": str(a.messages_total),
                           "historyId": str(a.highest_modseq), "quotaBytes": str(a.quota_bytes),
                           "usedBytes": str(a.used_bytes)}
    created = ts(a.create_time, a.HasField("create_time"))
    if created:
        out["createTime"] = created
    return out


def send_status(v: int) -> str:
    return send_service_pb2.SendStatus.Name(v)  # type: ignore[arg-type]

