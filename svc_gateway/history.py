"""Mailbox history for REST clients: changelog entries (MailboxService.ListChanges, ordered by
MODSEQ, which is also the history id) rendered as Gmail-like JSON, for `GET /v1/history` and for
the WebSocket push (`svc_gateway/push.py`), and the signed page tokens of the history listing.

A history record (`GET /v1/history`):
    {"id": "42", "type": "labelsChanged", "time": "...", "messages": [{"id", "threadId"}],
     "labelsAdded": [{"message": {"id", "threadId", "labelIds"}, "labelIds": [...]}], "labelsRemoved": [...]}
with, by type, `messagesAdded` / `messagesDeleted` (`[{"message": {...}}]`), `labelsAdded` /
`labelsRemoved`, `flagsChanged` (`[{"message", "unread", "starred", "keywords"}]`) or `label`
(`{"id"}`, for labelCreated / labelUpdated / labelDeleted).

A push event (one WebSocket text frame) is flat:
    {"type": "messageAdded", "historyId": "42", "time": "...", "message": {"id", "threadId", "labelIds"},
     "unread": true, "starred": false}
plus `addedLabelIds` / `removedLabelIds` (labelsChanged), `keywords` (flagsChanged) or `label`.
History ids are decimal strings (uint64 in the protobuf JSON mapping).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from mailmesh.v1 import types_pb2
from pydantic import BaseModel, Field

from svc_gateway.errors import invalid

T = types_pb2

# ChangeType -> the camelCase type name clients see
TYPE_NAMES: dict[int, str] = {
    T.CHANGE_TYPE_MESSAGE_ADDED: "messageAdded",
    T.CHANGE_TYPE_LABELS_CHANGED: "labelsChanged",
    T.CHANGE_TYPE_FLAGS_CHANGED: "flagsChanged",
    T.CHANGE_TYPE_MESSAGE_DELETED: "messageDeleted",
    T.CHANGE_TYPE_LABEL_CREATED: "labelCreated",
    T.CHANGE_TYPE_LABEL_UPDATED: "labelUpdated",
    T.CHANGE_TYPE_LABEL_DELETED: "labelDeleted",
    T.CHANGE_TYPE_DELIVERY_UPDATED: "deliveryUpdated",
    T.CHANGE_TYPE_THREAD_CHANGED: "threadChanged",
}
_LABEL_TYPES = {T.CHANGE_TYPE_LABEL_CREATED, T.CHANGE_TYPE_LABEL_UPDATED, T.CHANGE_TYPE_LABEL_DELETED}

# GET /v1/history page sizes (Gmail: default 100, max 500)
DEFAULT_PAGE = 100
MAX_PAGE = 500
MAX_TOKEN_CHARS = 512


# --- JSON -----------------------------------------------------------------------------------------

def type_name(change: T.Change) -> str:
    return TYPE_NAMES.get(change.type, "unknown")


def _time(change: T.Change) -> str | None:
    if not change.HasField("time"):
        return None
    return str(change.time.ToJsonString())


def _message(change: T.Change, *, with_labels: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"id": change.message_id, "threadId": change.thread_id}
    if with_labels:
        out["labelIds"] = list(change.label_ids)
    return out


def event_json(change: T.Change) -> dict[str, Any]:
    """The push event for one change (see the module docstring)."""
    out: dict[str, Any] = {"type": type_name(change), "historyId": str(change.modseq)}
    when = _time(change)
    if when:
        out["time"] = when
    if change.type in _LABEL_TYPES:
        out["label"] = {"id": change.label_id}
        return out
    deleted = change.type == T.CHANGE_TYPE_MESSAGE_DELETED
    out["message"] = _message(change, with_labels=not deleted)
    if deleted:
        return out
    out["unread"] = change.unread
    out["starred"] = change.starred
    if change.type == T.CHANGE_TYPE_LABELS_CHANGED:
        out["addedLabelIds"] = list(change.added_label_ids)
        out["removedLabelIds"] = list(change.removed_label_ids)
    elif change.type == T.CHANGE_TYPE_FLAGS_CHANGED:
        out["keywords"] = list(change.keywords)
    return out


def record_json(change: T.Change) -> dict[str, Any]:
    """The history record for one change (see the module docstring)."""
    out: dict[str, Any] = {"id": str(change.modseq), "type": type_name(change)}
    when = _time(change)
    if when:
        out["time"] = when
    if change.type in _LABEL_TYPES:
        out["label"] = {"id": change.label_id}
        return out
    if not change.message_id:
        return out
    out["messages"] = [_message(change, with_labels=False)]
    msg = _message(change, with_labels=change.type != T.CHANGE_TYPE_MESSAGE_DELETED)
    if change.type == T.CHANGE_TYPE_MESSAGE_ADDED:
        out["messagesAdded"] = [{"message": msg}]
    elif change.type == T.CHANGE_TYPE_MESSAGE_DELETED:
        out["messagesDeleted"] = [{"message": msg}]
    elif change.type == T.CHANGE_TYPE_LABELS_CHANGED:
        if change.added_label_ids:
            out["labelsAdded"] = [{"message": msg, "labelIds": list(change.added_label_ids)}]
        if change.removed_label_ids:
            out["labelsRemoved"] = [{"message": msg, "labelIds": list(change.removed_label_ids)}]
    elif change.type == T.CHANGE_TYPE_FLAGS_CHANGED:
        out["flagsChanged"] = [{"message": msg, "unread": change.unread, "starred": change.starred,
                                "keywords": list(change.keywords)}]
    return out


# --- response models (the OpenAPI document) -------------------------------------------------------

class HistoryMessage(BaseModel):
    """A message a change concerns; `labelIds` are its labels after the change."""

    id: str
    threadId: str  # noqa: N815 (the protobuf JSON mapping is camelCase)
    labelIds: list[str] | None = None  # noqa: N815


class HistoryMessageChange(BaseModel):
    """A message that was added or deleted."""

    message: HistoryMessage


class HistoryLabelsChange(BaseModel):
    """Labels added to or removed from a message."""

    message: HistoryMessage
    labelIds: list[str]  # noqa: N815


class HistoryFlagsChange(BaseModel):
    """A message's flags after a change."""

    message: HistoryMessage
    unread: bool
    starred: bool
    keywords: list[str]


class HistoryLabel(BaseModel):
    """A label that was created, renamed or deleted."""

    id: str


class HistoryRecord(BaseModel):
    """One change of the mailbox; `id` is its history id."""

    id: str
    type: str = Field(description="messageAdded, labelsChanged, flagsChanged, messageDeleted, labelCreated, "
                                  "labelUpdated, labelDeleted, deliveryUpdated or threadChanged")
    time: str | None = None
    messages: list[HistoryMessage] | None = None
    messagesAdded: list[HistoryMessageChange] | None = None  # noqa: N815
    messagesDeleted: list[HistoryMessageChange] | None = None  # noqa: N815
    labelsAdded: list[HistoryLabelsChange] | None = None  # noqa: N815
    labelsRemoved: list[HistoryLabelsChange] | None = None  # noqa: N815
    flagsChanged: list[HistoryFlagsChange] | None = None  # noqa: N815
    label: HistoryLabel | None = None


class HistoryList(BaseModel):
    """One page of changes after a history id, oldest first."""

    history: list[HistoryRecord]
    historyId: str = Field(description="the mailbox's current history id")  # noqa: N815
    nextPageToken: str | None = None  # noqa: N815


# --- page tokens ----------------------------------------------------------------------------------

class HistoryTokens:
    """Opaque page tokens of GET /v1/history: the last history id returned, bound to the user and
    to the request's `since`, signed (HMAC-SHA256 keyed from the mesh secret, so every gateway
    replica accepts the tokens of the others); a tampered or foreign token is a 400."""

    def __init__(self, secret: str) -> None:
        self.key = hashlib.sha256(b"mailmesh-history-token:" + secret.encode()).digest()

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.key, body, hashlib.sha256).digest()[:16]

    def encode(self, user: str, since: int, position: int) -> str:
        body = json.dumps([user, since, position], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(self._mac(body) + body).decode().rstrip("=")

    def decode(self, token: str, user: str, since: int) -> int:
        """The position the token continues after; ApiError 400 when it is not valid here."""
        if len(token) > MAX_TOKEN_CHARS:
            raise invalid("pageToken is not valid")
        try:
            blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            mac, body = blob[:16], blob[16:]
            if not hmac.compare_digest(mac, self._mac(body)):
                raise ValueError
            t_user, t_since, position = json.loads(body)
            if not isinstance(t_since, int) or not isinstance(position, int) or position < t_since:
                raise ValueError
        except (ValueError, TypeError):
            raise invalid("pageToken is not valid") from None
        if t_user != user or t_since != since:
            raise invalid("pageToken does not belong to this history listing (same user and since required)")
        return position
