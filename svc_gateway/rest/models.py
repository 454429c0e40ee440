"""Request and response bodies of the REST API (pydantic), named and shaped after the protobuf
JSON mapping of the mailmesh.v1 messages: camelCase, 64-bit integers as decimal strings,
timestamps in RFC 3339, bytes in base64. Response fields absent from a format are omitted."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# ids of messages, threads, labels and drafts as they appear in paths and bodies
ID_PATTERN = r"^[A-Za-z0-9_.~-]{1,200}$"
Int64 = str  # protobuf JSON mapping: int64/uint64 are decimal strings
IdStr = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
ATTACHMENT_ID_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,9}){0,31}$"
MAX_IDS = 1000
MAX_LABEL_IDS = 100


class _Request(BaseModel):
    # strict: JSON types are not coerced (0 is not false, "1" is not 1), as protobuf JSON parsing
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Response):
    code: str = Field(description="Stable machine-readable code, e.g. NOT_FOUND")
    message: str = Field(description="What went wrong, for developers")


class ErrorBody(_Response):
    error: ErrorDetail


# --- auth --------------------------------------------------------------------------------------------

class TokenRequest(_Request):
    email: str = Field(min_length=1, max_length=512, description="The account's address")
    password: str = Field(min_length=1, max_length=1024)


class TokenResponse(_Response):
    accessToken: str = Field(description="Opaque bearer token: send it as `Authorization: Bearer <token>`")
    tokenType: Literal["Bearer"] = "Bearer"
    expiresIn: int = Field(description="Seconds until the token expires")
    expireTime: str = Field(description="When the token expires (RFC 3339)")
    userId: str


# --- profile and labels ---------------------------------------------------------------------------------

class Profile(_Response):
    userId: str
    emailAddress: str
    displayName: str
    addresses: list[str]
    messagesTotal: Int64
    historyId: Int64 = Field(description="Highest history id (MODSEQ) of the mailbox")
    quotaBytes: Int64
    usedBytes: Int64
    createTime: str | None = None


class Label(_Response):
    id: str
    name: str
    type: Literal["LABEL_TYPE_SYSTEM", "LABEL_TYPE_USER", "LABEL_TYPE_UNSPECIFIED"]
    messagesTotal: Int64
    messagesUnread: Int64
    threadsTotal: Int64


class LabelList(_Response):
    labels: list[Label]


class LabelCreate(_Request):
    name: str = Field(min_length=1, max_length=225, description='Display name; nest with "/"')


class LabelPatch(_Request):
    name: str = Field(min_length=1, max_length=225, description="New display name")


# --- messages ----------------------------------------------------------------------------------------------

class Address(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(default="", max_length=500)
    email: str = Field(max_length=512)


class Attachment(_Response):
    attachmentId: str
    filename: str
    mimeType: str
    size: Int64
    contentId: str
    inline: bool


class RecipientStatus(_Response):
    email: str
    state: str
    lastReply: str
    attempts: int
    updatedTime: str | None = None


class Message(_Response):
    """A message; which fields are present depends on the format asked for."""

    id: str
    threadId: str
    labelIds: list[str] | None = None
    unread: bool | None = None
    starred: bool | None = None
    keywords: list[str] | None = None
    snippet: str | None = None
    sizeEstimate: Int64 | None = None
    internalDate: str | None = None
    historyId: Int64 | None = None
    subject: str | None = None
    from_: list[Address] | None = Field(default=None, alias="from")
    to: list[Address] | None = None
    cc: list[Address] | None = None
    bcc: list[Address] | None = None
    replyTo: list[Address] | None = None
    date: str | None = None
    messageIdHeader: str | None = None
    inReplyTo: list[str] | None = None
    references: list[str] | None = None
    hasAttachments: bool | None = None
    attachments: list[Attachment] | None = None
    textBody: str | None = None
    htmlBody: str | None = None
    raw: str | None = Field(default=None, description="RFC 5322 bytes, base64 (format=raw)")
    recipients: list[RecipientStatus] | None = None
    parseWarnings: list[str] | None = None


class MessageList(_Response):
    messages: list[Message]
    nextPageToken: str | None = None
    resultSizeEstimate: Int64


class OutgoingAttachment(_Request):
    filename: str = Field(min_length=1, max_length=255)
    mimeType: str = Field(default="", max_length=255)
    data: str = Field(description="The file's bytes, base64 (standard or URL-safe alphabet)")
    contentId: str = Field(default="", max_length=250)
    inline: bool = False


class SendRequest(_Request):
    to: list[Address] = Field(default_factory=list, max_length=1000)
    cc: list[Address] = Field(default_factory=list, max_length=1000)
    bcc: list[Address] = Field(default_factory=list, max_length=1000)
    replyTo: list[Address] = Field(default_factory=list, max_length=100)
    subject: str = Field(default="", max_length=2000)
    textBody: str = ""
    htmlBody: str = ""
    attachments: list[OutgoingAttachment] = Field(default_factory=list, max_length=100)
    replyToMessageId: str = Field(default="", max_length=200, pattern=r"^([A-Za-z0-9_.~-]{1,200})?$")
    sendTime: str | None = Field(default=None, description="Scheduled send time (RFC 3339); unset: now + undo window")
    fromEmail: str = Field(default="", max_length=512)


class SendResponse(_Response):
    id: str
    threadId: str
    status: str = Field(description="SEND_STATUS_QUEUED, SEND_STATUS_SCHEDULED or SEND_STATUS_SENT")
    sendTime: str | None = None


class ModifyRequest(_Request):
    addLabelIds: list[IdStr] = Field(default_factory=list, max_length=MAX_LABEL_IDS)
    removeLabelIds: list[IdStr] = Field(default_factory=list, max_length=MAX_LABEL_IDS)
    unread: bool | None = None
    starred: bool | None = None


class BatchModifyRequest(ModifyRequest):
    ids: list[IdStr] = Field(min_length=1, max_length=MAX_IDS)


class BatchModifyResponse(_Response):
    modifiedIds: list[str]


# --- threads -------------------------------------------------------------------------------------------

class Thread(_Response):
    id: str
    snippet: str
    historyId: Int64
    messageCount: int
    labelIds: list[str]
    unread: bool
    subject: str
    lastMessageTime: str | None = None
    messages: list[Message] | None = None


class ThreadList(_Response):
    threads: list[Thread]
    nextPageToken: str | None = None
    resultSizeEstimate: Int64


# --- drafts --------------------------------------------------------------------------------------------

class DraftContent(_Request):
    to: list[Address] = Field(default_factory=list, max_length=1000)
    cc: list[Address] = Field(default_factory=list, max_length=1000)
    bcc: list[Address] = Field(default_factory=list, max_length=1000)
    replyTo: list[Address] = Field(default_factory=list, max_length=100)
    subject: str = Field(default="", max_length=2000)
    textBody: str = ""
    htmlBody: str = ""
    attachments: list[OutgoingAttachment] = Field(default_factory=list, max_length=100)
    replyToMessageId: str = Field(default="", max_length=200, pattern=r"^([A-Za-z0-9_.~-]{1,200})?$")
    fromEmail: str = Field(default="", max_length=512)


class DraftRequest(_Request):
    message: DraftContent


class Draft(_Response):
    id: str
    message: Message


class DraftList(_Response):
    drafts: list[Draft]
    nextPageToken: str | None = None
    resultSizeEstimate: Int64
