"""Sending limits with clear messages, request validation, and idempotent retries."""

from __future__ import annotations

import grpc
import pytest
from mailmesh.v1 import send_service_pb2 as spb

from tests.svc_send.conftest import REMOTE, SendMesh, wait_for


async def _status(coro: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await coro  # type: ignore[misc]
    return err.value.code(), err.value.details() or ""


@pytest.mark.send_settings(sends_per_day=2, max_recipients_per_message=3, max_message_bytes=200_000)
async def test_limits_answer_with_clear_errors(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    code, text = await _status(sm.send_mail(alice, to=tuple(f"r{i}@{REMOTE}" for i in range(4))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "4 recipients; at most 3" in text
    code, text = await _status(sm.send_mail(alice, to=(f"dave@{REMOTE}",), attachments=[
        spb.OutgoingAttachment(filename="big.bin", data=b"x" * 250_000)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is" in text
    code, text = await _status(sm.send_mail(alice, to=(f"dave@{REMOTE}",), attachments=[
        spb.OutgoingAttachment(filename="b.bin", data=b"\x00\xff" * 80_000)]))  # fits raw, not base64-encoded
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "bytes); the limit is" in text
    await sm.send_mail(alice, to=(f"dave@{REMOTE}",))
    await sm.send_mail(alice, to=(f"dave@{REMOTE}",))
    code, text = await _status(sm.send_mail(alice, to=(f"dave@{REMOTE}",)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "daily sending limit reached: 2 of 2" in text
    # other users have their own allowance
    await sm.send_mail(sm.users["bob"], to=(f"dave@{REMOTE}",))


async def test_bad_requests_are_invalid_argument(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    for kwargs, words in (
            ({"to": ()}, "no recipients"),
            ({"to": ("not-an-address",)}, "to:"),
            ({"to": (f"d@{REMOTE}",), "subject": "line\nbreak"}, "line breaks"),
            ({"to": (f"d@{REMOTE}",), "from_email": "mallory@example.com"}, "not one of the account's addresses"),
            ({"to": (f"d@{REMOTE}",), "idempotency_key": "k" * 201}, "idempotency_key")):
        code, text = await _status(sm.send_mail(alice, **kwargs))  # type: ignore[arg-type]
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in text, (kwargs, text)
    code, _ = await _status(sm.send_mail(alice, to=(f"d@{REMOTE}",), reply_to_message_id="nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert sm.sink.messages == [] and await sm.label(alice, "SENT") == []


async def test_a_retried_send_with_the_same_key_sends_once(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    first = await sm.send_mail(alice, to=(f"dave@{REMOTE}",), subject="once", idempotency_key="req-42")
    second = await sm.send_mail(alice, to=(f"dave@{REMOTE}",), subject="once", idempotency_key="req-42")
    assert (second.message_id, second.thread_id) == (first.message_id, first.thread_id)
    await wait_for(lambda: _got(sm), "the delivery")
    third = await sm.send_mail(alice, to=(f"dave@{REMOTE}",), subject="once", idempotency_key="req-43")
    assert third.message_id != first.message_id
    await wait_for(lambda: _got(sm, 2), "the second delivery")
    assert len(sm.sink.messages) == 2
    assert len(await sm.label(alice, "SENT")) == 2


async def _got(sm: SendMesh, n: int = 1) -> bool:
    return len(sm.sink.messages) >= n
