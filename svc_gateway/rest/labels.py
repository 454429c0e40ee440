"""Labels (also served as `/v1/folders`): list with total/unread counts, get, create, rename,
delete."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from google.protobuf.field_mask_pb2 import FieldMask
from mailmesh.v1 import mailbox_service_pb2 as mpb
from mailmesh.v1 import types_pb2

from svc_gateway.deps import gateway
from svc_gateway.rest import convert
from svc_gateway.rest.common import ERRORS, ME, LabelId, User, call, check_id, json
from svc_gateway.rest.models import Label, LabelCreate, LabelList, LabelPatch
from svc_gateway.tokens import TokenInfo

router = APIRouter(prefix="/v1", tags=["labels"])


def _name(label_id: str) -> str:
    return f"{ME}/labels/{check_id(label_id, 'label id')}"


async def _list(request: Request, user: TokenInfo) -> Response:
    r = await gateway(request).mailbox.ListLabels(mpb.ListLabelsRequest(parent=ME), **call(user))
    return json({"labels": [convert.label(lb) for lb in r.labels]})


@router.get("/labels", response_model=LabelList, responses=ERRORS)
async def list_labels(request: Request, user: TokenInfo = User) -> Response:
    """Every label of the mailbox (system and user) with its message, unread and thread counts."""
    return await _list(request, user)


@router.get("/folders", response_model=LabelList, responses=ERRORS)
async def list_folders(request: Request, user: TokenInfo = User) -> Response:
    """The labels, by their folder name (same as GET /v1/labels)."""
    return await _list(request, user)


@router.get("/labels/{label_id}", response_model=Label, responses=ERRORS)
async def get_label(label_id: LabelId, request: Request, user: TokenInfo = User) -> Response:
    """One label with its counts."""
    r = await gateway(request).mailbox.GetLabel(mpb.GetLabelRequest(name=_name(label_id)), **call(user))
    return json(convert.label(r.label))


@router.post("/labels", response_model=Label, responses=ERRORS)
async def create_label(body: LabelCreate, request: Request, user: TokenInfo = User) -> Response:
    """Creates a user label."""
    r = await gateway(request).mailbox.CreateLabel(mpb.CreateLabelRequest(parent=ME, name=body.name),
                                                   **call(user))
    return json(convert.label(r.label))


@router.patch("/labels/{label_id}", response_model=Label, responses=ERRORS)
async def patch_label(label_id: LabelId, body: LabelPatch, request: Request, user: TokenInfo = User) -> Response:
    """Renames a user label."""
    r = await gateway(request).mailbox.UpdateLabel(
        mpb.UpdateLabelRequest(name=_name(label_id), label=types_pb2.Label(name=body.name),
                               update_mask=FieldMask(paths=["name"])), **call(user))
    return json(convert.label(r.label))


@router.delete("/labels/{label_id}", status_code=204, responses=ERRORS)
async def delete_label(label_id: LabelId, request: Request, user: TokenInfo = User) -> Response:
    """Deletes a user label; its messages stay, without the label."""
    await gateway(request).mailbox.DeleteLabel(mpb.DeleteLabelRequest(name=_name(label_id)), **call(user))
    return Response(status_code=204)
