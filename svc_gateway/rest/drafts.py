"""Drafts: create, replace, get, list and delete unsent messages kept in the DRAFTS label.

The gateway composes the draft (the shared composer, mailmesh_common/mime/compose.py) and stores it
with MailboxService.AppendMessage (DRAFTS, read, `\\Draft`). A draft keeps its id across
replacements: the id is that of its first message, and the gateway's store maps it to the
current message (("draft", user, draft id) -> message id, and back). Drafts made elsewhere (IMAP,
an undone send) have their message id as draft id."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Query, Request, Response
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import types_pb2

from mailmesh_common import telemetry
from mailmesh_common.kv import Database, Transaction
from mailmesh_common.mime.compose import AttachmentIn, compose, mail_address, new_message_id
from mailmesh_common.mime.compose import Draft as ComposeDraft
from svc_gateway.deps import gateway
from svc_gateway.errors import from_grpc, invalid, not_found
from svc_gateway.rest import convert, outgoing
from svc_gateway.rest.common import ERRORS, ME, DraftId, User, call, check_id, json, message_name
from svc_gateway.rest.models import Address, Draft, DraftContent, DraftList, DraftRequest
from svc_gateway.state import GatewayState
from svc_gateway.tokens import SPACE, TokenInfo

router = APIRouter(prefix="/v1", tags=["drafts"])
_FWD = SPACE["draft"]
_REV = SPACE["draftmsg"]


def _db(gw: GatewayState) -> Database:
    assert gw.db is not None
    return gw.db


async def _current_message(gw: GatewayState, user: TokenInfo, draft_id: str) -> str:
    key = _FWD.pack((user.user_id, draft_id))
    raw = await _db(gw).run(lambda tr: tr.get(key), readonly=True)
    return raw.decode() if raw else draft_id


async def _draft_ids(gw: GatewayState, user: TokenInfo, message_ids: list[str]) -> list[str]:
    keys = [_REV.pack((user.user_id, m)) for m in message_ids]

    def fn(tr: Transaction) -> list[str]:
        out = []
        for k, m in zip(keys, message_ids, strict=True):
            raw = tr.get(k)
            out.append(raw.decode() if raw else m)
        return out

    return await _db(gw).run(fn, readonly=True)


async def _load(gw: GatewayState, user: TokenInfo, draft_id: str,
                fmt: types_pb2.MessageFormat.ValueType) -> types_pb2.Message:
    msg_id = await _current_message(gw, user, check_id(draft_id, "draft id"))
    r = await gw.mailbox.GetMessage(mpb.GetMessageRequest(name=message_name(msg_id), format=fmt), **call(user))
    if "DRAFTS" not in r.message.label_ids:
        raise not_found("draft not found")
    return r.message


def _addr_list(items: list[Address], what: str) -> list[Any]:
    try:
        return [mail_address(a.name, a.email, field_name=what) for a in items]
    except Exception as exc:  # InvalidInput from the composer
        raise invalid(getattr(exc, "message", f"{what}: invalid address")) from None


async def _compose(gw: GatewayState, user: TokenInfo, body: DraftContent) -> bytes:
    acct = (await gw.mailbox.GetAccount(mpb.GetAccountRequest(name=ME), **call(user))).account
    sender_email = body.fromEmail.strip() or acct.email
    if sender_email.lower() not in {a.lower() for a in acct.addresses} | {acct.email.lower()}:
        raise invalid("fromEmail: not one of the account's addresses")
    parent = None
    if body.replyToMessageId:
        parent = (await gw.mailbox.GetMessage(mpb.GetMessageRequest(
            name=message_name(body.replyToMessageId), format=types_pb2.MESSAGE_FORMAT_METADATA),
            **call(user))).message
    atts = outgoing.attachments(body.attachments, gw.settings.max_message_bytes)
    draft = ComposeDraft(
        sender=mail_address(acct.display_name, sender_email, field_name="fromEmail"),
        to=_addr_list(body.to, "to"), cc=_addr_list(body.cc, "cc"), bcc=_addr_list(body.bcc, "bcc"),
        reply_to=_addr_list(body.replyTo, "replyTo"), subject=body.subject, text=body.textBody, html=body.htmlBody,
        attachments=[AttachmentIn(a.filename, a.data, a.mime_type, a.content_id, a.inline) for a in atts],
        parent=parent)
    composed = compose(draft, message_id=new_message_id(sender_email.rpartition("@")[2]), date=datetime.now(UTC))
    if len(composed.sent_raw) > gw.settings.max_message_bytes:
        raise outgoing.too_large(gw.settings.max_message_bytes)
    return composed.sent_raw


async def _append(gw: GatewayState, user: TokenInfo, raw: bytes) -> types_pb2.Message:
    r = await gw.mailbox.AppendMessage(mpb.AppendMessageRequest(
        parent=ME, raw=raw, label_ids=["DRAFTS"], unread=False, keywords=["\\Draft"]), **call(user))
    return r.message


@router.post("/drafts", response_model=Draft, responses=ERRORS)
async def create_draft(body: DraftRequest, request: Request, user: TokenInfo = User) -> Response:
    """Saves a new draft."""
    gw = gateway(request)
    with telemetry.tracer("svc_gateway").start_as_current_span("gateway.draft.create"):
        msg = await _append(gw, user, await _compose(gw, user, body.message))
    return json({"id": msg.id, "message": convert.message(msg)})


@router.put("/drafts/{draft_id}", response_model=Draft, responses=ERRORS)
async def replace_draft(draft_id: DraftId, body: DraftRequest, request: Request, user: TokenInfo = User) -> Response:
    """Replaces a draft's content; the draft keeps its id (its message gets a new one)."""
    gw = gateway(request)
    with telemetry.tracer("svc_gateway").start_as_current_span("gateway.draft.replace"):
        old = await _load(gw, user, draft_id, types_pb2.MESSAGE_FORMAT_MINIMAL)
        msg = await _append(gw, user, await _compose(gw, user, body.message))
        fwd = _FWD.pack((user.user_id, draft_id))

        def remap(tr: Transaction) -> None:
            tr.set(fwd, msg.id.encode())
            tr.set(_REV.pack((user.user_id, msg.id)), draft_id.encode())
            tr.clear(_REV.pack((user.user_id, old.id)))

        await _db(gw).run(remap)
        try:
            await gw.mailbox.DeleteMessage(mpb.DeleteMessageRequest(name=message_name(old.id)), **call(user))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise from_grpc(exc) from None
    return json({"id": draft_id, "message": convert.message(msg)})


@router.get("/drafts/{draft_id}", response_model=Draft, responses=ERRORS)
async def get_draft(draft_id: DraftId, request: Request, user: TokenInfo = User,
                    format: Annotated[Literal["minimal", "metadata", "full", "raw"], Query()] = "full") -> Response:
    """One draft with its message."""
    fmt = convert.FORMATS[format]
    msg = await _load(gateway(request), user, draft_id, fmt)
    return json({"id": draft_id, "message": convert.message(msg, fmt)})


@router.get("/drafts", response_model=DraftList, responses=ERRORS)
async def list_drafts(request: Request, user: TokenInfo = User,
                      maxResults: Annotated[int, Query(ge=1, le=500)] = 50,
                      pageToken: Annotated[str, Query(max_length=2048)] = "") -> Response:
    """One page of drafts, newest first."""
    gw = gateway(request)
    r = await gw.mailbox.ListMessages(mpb.ListMessagesRequest(
        parent=ME, label_id="DRAFTS", page_size=maxResults, page_token=pageToken,
        format=types_pb2.MESSAGE_FORMAT_METADATA), **call(user))
    ids = await _draft_ids(gw, user, [m.id for m in r.messages])
    body: dict[str, Any] = {
        "drafts": [{"id": d, "message": convert.message(m, types_pb2.MESSAGE_FORMAT_METADATA)}
                   for d, m in zip(ids, r.messages, strict=True)],
        "resultSizeEstimate": str(r.result_size_estimate)}
    if r.next_page_token:
        body["nextPageToken"] = r.next_page_token
    return json(body)


@router.delete("/drafts/{draft_id}", status_code=204, responses=ERRORS)
async def delete_draft(draft_id: DraftId, request: Request, user: TokenInfo = User) -> Response:
    """Deletes a draft forever."""
    gw = gateway(request)
    msg = await _load(gw, user, draft_id, types_pb2.MESSAGE_FORMAT_MINIMAL)
    await gw.mailbox.DeleteMessage(mpb.DeleteMessageRequest(name=message_name(msg.id)), **call(user))

    def forget(tr: Transaction) -> None:
        tr.clear(_FWD.pack((user.user_id, draft_id)))
        tr.clear(_REV.pack((user.user_id, msg.id)))

    await _db(gw).run(forget)
    return Response(status_code=204)
