"""Threads: list (by label, unread, starred) and get with its messages."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from mailmesh.v1 import mailbox_service_pb2 as mpb

from svc_gateway.deps import gateway
from svc_gateway.rest import convert
from svc_gateway.rest.common import ERRORS, ME, ThreadId, User, call, check_id, json
from svc_gateway.rest.models import IdStr, Thread, ThreadList
from svc_gateway.tokens import TokenInfo

router = APIRouter(prefix="/v1", tags=["threads"])


@router.get("/threads", response_model=ThreadList, responses=ERRORS)
async def list_threads(
    request: Request,
    user: TokenInfo = User,
    labelIds: Annotated[list[IdStr], Query(max_length=1, description="Only threads with a message in this label")] = [],  # noqa: B006
    unread: bool = False,
    starred: bool = False,
    maxResults: Annotated[int, Query(ge=1, le=500)] = 50,
    pageToken: Annotated[str, Query(max_length=2048)] = "",
) -> Response:
    """One page of threads, newest activity first."""
    label = check_id(labelIds[0], "labelIds") if labelIds else ""
    r = await gateway(request).mailbox.ListThreads(mpb.ListThreadsRequest(
        parent=ME, label_id=label, unread_only=unread, starred_only=starred, page_size=maxResults,
        page_token=pageToken), **call(user))
    body: dict[str, Any] = {"threads": [convert.thread(t) for t in r.threads],
                            "resultSizeEstimate": str(r.result_size_estimate)}
    if r.next_page_token:
        body["nextPageToken"] = r.next_page_token
    return json(body)


@router.get("/threads/{thread_id}", response_model=Thread, responses=ERRORS)
async def get_thread(thread_id: ThreadId, request: Request, user: TokenInfo = User,
                     format: Annotated[Literal["minimal", "metadata", "full"], Query()] = "metadata") -> Response:
    """A thread with its messages, oldest first."""
    fmt = convert.FORMATS[format]
    r = await gateway(request).mailbox.GetThread(
        mpb.GetThreadRequest(name=f"{ME}/threads/{check_id(thread_id, 'thread id')}", format=fmt), **call(user))
    return json(convert.thread(r.thread, fmt))
