"""Turning REST bodies of outgoing mail (send, drafts) into protobuf: addresses, base64
attachments (with the 25 MB limit: 413 ATTACHMENT_TOO_LARGE), RFC 3339 send times."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import send_service_pb2 as sendpb
from mailmesh.v1 import types_pb2

from svc_gateway.errors import ApiError, invalid
from svc_gateway.rest.models import Address, OutgoingAttachment


def addresses(items: Sequence[Address]) -> list[types_pb2.Address]:
    return [types_pb2.Address(name=a.name, email=a.email) for a in items]


def decode_b64(data: str, what: str) -> bytes:
    s = "".join(data.split())
    try:
        if "-" in s or "_" in s:
            return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
        return base64.b64decode(s + "=" * (-len(s) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{what}: not valid base64") from None


def attachments(items: Sequence[OutgoingAttachment], limit_bytes: int) -> list[sendpb.OutgoingAttachment]:
    out = []
    total = 0
    for i, a in enumerate(items):
        if len(a.data) > limit_bytes * 4 // 3 + 8:  # cheap check before decoding
            raise too_large(limit_bytes)
        data = decode_b64(a.data, f"attachments[{i}].data")
        total += len(data)
        if total > limit_bytes:
            raise too_large(limit_bytes)
        out.append(sendpb.OutgoingAttachment(filename=a.filename, mime_type=a.mimeType, data=data,
                                             content_id=a.contentId, inline=a.inline))
    return out


def too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, "ATTACHMENT_TOO_LARGE", f"attachments over the limit of {limit_bytes} bytes")


def timestamp(value: str, what: str) -> Timestamp:
    t = Timestamp()
    try:
        t.FromJsonString(value)
    except (ValueError, TypeError):
        raise invalid(f"{what}: expected an RFC 3339 time like 2030-01-01T09:00:00Z") from None
    return t
