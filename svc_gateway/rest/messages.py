"""Messages: list (label filters, or a search query through svc_search), get in four formats,
attachments (streamed, always as a download), send (with undo and Idempotency-Key), cancel,
modify, batch modify, trash, untrash and delete."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import search_service_pb2 as searchpb
from mailmesh.v1 import send_service_pb2 as sendpb

from mailmesh_common import telemetry
from svc_gateway.deps import gateway
from svc_gateway.errors import from_grpc, invalid, not_found
from svc_gateway.rest import convert, outgoing
from svc_gateway.rest.common import ERRORS, ME, MessageId, User, call, check_id, json, md, message_name
from svc_gateway.rest.models import (
    ATTACHMENT_ID_PATTERN,
    MAX_LABEL_IDS,
    BatchModifyRequest,
    BatchModifyResponse,
    IdStr,
    Message,
    MessageList,
    ModifyRequest,
    SendRequest,
    SendResponse,
)
from svc_gateway.tokens import TokenInfo

router = APIRouter(prefix="/v1", tags=["messages"])

MAX_QUERY_CHARS = 2000
MAX_PAGE_TOKEN_CHARS = 2048
MAX_IDEMPOTENCY_KEY = 200
_HIDDEN = {"SPAM", "TRASH"}
_MIME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")


def _labels_filter(label_ids: list[str]) -> list[str]:
    if len(label_ids) > MAX_LABEL_IDS:
        raise invalid(f"at most {MAX_LABEL_IDS} labelIds")
    return [check_id(x, "labelIds") for x in label_ids]


@router.get("/messages", response_model=MessageList, responses=ERRORS)
async def list_messages(
    request: Request,
    user: TokenInfo = User,
    labelIds: Annotated[list[IdStr], Query(max_length=MAX_LABEL_IDS, description="Only messages carrying every one of these labels")] = [],  # noqa: B006
    unread: Annotated[bool, Query(description="Only unread messages")] = False,
    starred: Annotated[bool, Query(description="Only starred messages")] = False,
    q: Annotated[str, Query(max_length=MAX_QUERY_CHARS, description="Gmail-style search query")] = "",
    includeSpamTrash: Annotated[bool, Query(description="Also list messages in SPAM and TRASH")] = False,
    maxResults: Annotated[int, Query(ge=1, le=500)] = 50,
    pageToken: Annotated[str, Query(max_length=MAX_PAGE_TOKEN_CHARS)] = "",
    format: Annotated[Literal["minimal", "metadata"], Query()] = "minimal",
) -> Response:
    """One page of messages, newest first. With `q` (or `includeSpamTrash` without labels) the
    listing is a search through svc_search; page tokens only continue the listing that made them."""
    gw = gateway(request)
    labels = _labels_filter(labelIds)
    if q.strip() or (includeSpamTrash and not labels):
        gw.limits.search(user.user_id)
        query = f"({q})" if q.strip() else ""
        terms = [query, *(f"label:{x}" for x in labels)]
        if unread:
            terms.append("is:unread")
        if starred:
            terms.append("is:starred")
        if includeSpamTrash:
            terms.append("in:anywhere")
        with telemetry.tracer("svc_gateway").start_as_current_span("gateway.search"):
            r = await gw.search.Search(searchpb.SearchRequest(parent=ME, query=" ".join(t for t in terms if t),
                                                              page_size=maxResults, page_token=pageToken),
                                       **call(user))
        body: dict[str, Any] = {"messages": [convert.search_result(x) for x in r.results],
                                "resultSizeEstimate": str(r.result_size_estimate)}
        if r.next_page_token:
            body["nextPageToken"] = r.next_page_token
        return json(body)
    fmt = convert.FORMATS[format]
    first = labels[0] if labels else ""
    resp = await gw.mailbox.ListMessages(mpb.ListMessagesRequest(
        parent=ME, label_id=first, unread_only=unread, starred_only=starred, page_size=maxResults,
        page_token=pageToken, format=fmt), **call(user))
    wanted = set(labels[1:])
    hide = set() if includeSpamTrash else _HIDDEN - {x.upper() for x in labels}
    items = []
    for m in resp.messages:
        have = set(m.label_ids)
        if wanted and not wanted <= have and not {w.upper() for w in wanted} <= have:
            continue
        if hide & have:
            continue
        items.append(convert.message(m, fmt))
    body = {"messages": items, "resultSizeEstimate": str(resp.result_size_estimate)}
    if resp.next_page_token:
        body["nextPageToken"] = resp.next_page_token
    return json(body)


@router.get("/messages/{message_id}", response_model=Message, responses=ERRORS)
async def get_message(message_id: MessageId, request: Request, user: TokenInfo = User,
                      format: Annotated[Literal["minimal", "metadata", "full", "raw"], Query()] = "full") -> Response:
    """One message: `minimal` (ids, labels, flags, snippet), `metadata` (+ headers), `full`
    (+ bodies and the attachment list) or `raw` (+ the RFC 5322 bytes in base64)."""
    fmt = convert.FORMATS[format]
    r = await gateway(request).mailbox.GetMessage(mpb.GetMessageRequest(name=message_name(message_id), format=fmt),
                                                  **call(user))
    return json(convert.message(r.message, fmt))


def _content_disposition(filename: str) -> str:
    """RFC 6266: an ASCII fallback and the UTF-8 name (RFC 5987)."""
    name = filename.replace("\r", "").replace("\n", "") or "attachment"
    ascii_name = "".join(c if 0x20 <= ord(c) < 0x7F and c not in '"\\;' else "_" for c in name)[:200]
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{urllib.parse.quote(name[:200], safe='')}"


@router.get("/messages/{message_id}/attachments/{attachment_id}", responses={
    **ERRORS, 200: {"description": "The attachment's bytes, as a download",
                    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def get_attachment(message_id: MessageId, attachment_id: Annotated[str, Path(pattern=ATTACHMENT_ID_PATTERN, max_length=64)], request: Request,
                         user: TokenInfo = User) -> Response:
    """Streams an attachment with its content type, as a download (`Content-Disposition:
    attachment`, `X-Content-Type-Options: nosniff`)."""
    name = message_name(message_id)
    if len(attachment_id) > 64 or not re.fullmatch(r"[0-9]{1,9}(\.[0-9]{1,9}){0,31}", attachment_id):
        raise invalid("attachment id is not valid")
    stream = gateway(request).mailbox.GetAttachment(mpb.GetAttachmentRequest(message=name, attachment_id=attachment_id),
                                                  metadata=md(user))
    it = stream.__aiter__()
    try:
        first = await it.__anext__()
    except StopAsyncIteration:
        raise not_found("attachment not found") from None
    except grpc.aio.AioRpcError as exc:
        raise from_grpc(exc) from None
    mime = first.attachment.mime_type if _MIME.match(first.attachment.mime_type or "") else "application/octet-stream"

    async def body() -> AsyncIterator[bytes]:
        try:
            if first.data:
                yield first.data
            async for chunk in it:
                if chunk.data:
                    yield chunk.data
        finally:
            stream.cancel()

    return StreamingResponse(body(), media_type=mime, headers={
        "Content-Disposition": _content_disposition(first.attachment.filename),
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox; default-src 'none'",
    })


@router.post("/messages", status_code=202, response_model=SendResponse, responses=ERRORS)
async def send_message(body: SendRequest, request: Request, user: TokenInfo = User,
                       idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None) -> Response:
    """Sends a message: it is stored in SENT at once and delivered after the undo window (or at
    `sendTime`). A retried request with the same `Idempotency-Key` returns the first result."""
    gw = gateway(request)
    key = (idempotency_key or "").strip()
    if len(key) > MAX_IDEMPOTENCY_KEY:
        raise invalid(f"Idempotency-Key: at most {MAX_IDEMPOTENCY_KEY} characters")
    if body.replyToMessageId:
        check_id(body.replyToMessageId, "replyToMessageId")
    req = sendpb.SendRequest(
        parent=ME, to=outgoing.addresses(body.to), cc=outgoing.addresses(body.cc), bcc=outgoing.addresses(body.bcc),
        reply_to=outgoing.addresses(body.replyTo), subject=body.subject, text_body=body.textBody,
        html_body=body.htmlBody, attachments=outgoing.attachments(body.attachments, gw.settings.max_message_bytes),
        reply_to_message_id=body.replyToMessageId, idempotency_key=key, from_email=body.fromEmail)
    if body.sendTime:
        req.send_time.CopyFrom(outgoing.timestamp(body.sendTime, "sendTime"))
    r = await gw.send.Send(req, **call(user))
    out: dict[str, Any] = {"id": r.message_id, "threadId": r.thread_id, "status": convert.send_status(r.status)}
    when = convert.ts(r.send_time, r.HasField("send_time"))
    if when:
        out["sendTime"] = when
    return json(out, 202)


@router.post("/messages/{message_id}/cancel", response_model=Message, responses=ERRORS)
async def cancel_send(message_id: MessageId, request: Request, user: TokenInfo = User) -> Response:
    """Undo send: stops a send still held (undo window or scheduled); the message moves to
    DRAFTS. 409 FAILED_PRECONDITION once delivery has started."""
    r = await gateway(request).send.CancelSend(sendpb.CancelSendRequest(name=message_name(message_id)),
                                               **call(user))
    return json(convert.message(r.message))


def _modify_request(ids: list[str], body: ModifyRequest) -> mpb.BatchModifyMessagesRequest:
    req = mpb.BatchModifyMessagesRequest(parent=ME, ids=[check_id(x, "ids") for x in ids],
                                         add_label_ids=_labels_filter(body.addLabelIds),
                                         remove_label_ids=_labels_filter(body.removeLabelIds))
    if body.unread is not None:
        req.unread = body.unread
    if body.starred is not None:
        req.starred = body.starred
    return req


@router.post("/messages/{message_id}/modify", response_model=Message, responses=ERRORS)
async def modify_message(message_id: MessageId, body: ModifyRequest, request: Request, user: TokenInfo = User) -> Response:
    """Adds and removes labels, marks read/unread, stars/unstars."""
    check_id(message_id, "message id")
    r = await gateway(request).mailbox.BatchModifyMessages(_modify_request([message_id], body), **call(user))
    if not r.messages:
        raise not_found("message not found")
    return json(convert.message(r.messages[0]))


@router.post("/messages:batchModify", response_model=BatchModifyResponse, responses=ERRORS)
async def batch_modify(body: BatchModifyRequest, request: Request, user: TokenInfo = User) -> Response:
    """Modifies up to 1,000 messages at once, all or nothing (404 when any id is unknown)."""
    r = await gateway(request).mailbox.BatchModifyMessages(_modify_request(body.ids, body), **call(user))
    return json({"modifiedIds": [m.id for m in r.messages]})


@router.post("/messages/{message_id}/trash", response_model=Message, responses=ERRORS)
async def trash_message(message_id: MessageId, request: Request, user: TokenInfo = User) -> Response:
    """Moves a message to TRASH."""
    r = await gateway(request).mailbox.TrashMessage(mpb.TrashMessageRequest(name=message_name(message_id)),
                                                    **call(user))
    return json(convert.message(r.message))


@router.post("/messages/{message_id}/untrash", response_model=Message, responses=ERRORS)
async def untrash_message(message_id: MessageId, request: Request, user: TokenInfo = User) -> Response:
    """Takes a message out of TRASH, back to the labels it had."""
    r = await gateway(request).mailbox.UntrashMessage(mpb.UntrashMessageRequest(name=message_name(message_id)),
                                                      **call(user))
    return json(convert.message(r.message))


@router.delete("/messages/{message_id}", status_code=204, responses=ERRORS)
async def delete_message(message_id: MessageId, request: Request, user: TokenInfo = User) -> Response:
    """Deletes a message forever."""
    await gateway(request).mailbox.DeleteMessage(mpb.DeleteMessageRequest(name=message_name(message_id)),
                                                 **call(user))
    return Response(status_code=204)


