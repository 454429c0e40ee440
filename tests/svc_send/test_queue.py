"""Queue visibility and operator actions, through the gRPC API and the `mailmesh queue`
commands: what waits, for whom, since when, attempts, last reply, next attempt; retry now;
cancel (the pending recipients bounce)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import types_pb2

from mailmesh_common.cli.main import run as _cli
from tests.svc_send.conftest import SendMesh, auth_md, wait_for


def _config(sm: SendMesh, tmp: Path) -> list[str]:
    assert sm.settings is not None
    conf = tmp / "cli.toml"
    conf.write_text(f'host = "127.0.0.1"\nsend_port = {sm.settings.send_port}\n')
    return ["--config", str(conf), "--data-dir", str(sm.settings.data_dir)]


def _unreachable(sm: SendMesh, domain: str) -> None:
    """MX of domain -> a host where nothing listens; ttl 0 so that a later change is seen at once."""
    sm.dns.add(domain, "MX", (10, f"mx.{domain}"), ttl=0)
    sm.dns.add(f"mx.{domain}", "A", "127.0.0.2", ttl=0)


async def _entry(sm: SendMesh, state: int, domain: str) -> spb.QueueEntry | None:
    assert sm.stub is not None
    r = await sm.stub.ListQueue(spb.ListQueueRequest(domain=domain), timeout=20)
    found = [e for e in r.entries if e.state == state]
    return found[0] if found else None


@pytest.mark.send_settings(outbound_retry_schedule_s="3600")
async def test_queue_list_show_retry_and_cancel(sm: SendMesh, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    alice = sm.users["alice"]
    _unreachable(sm, "slow.test")
    _unreachable(sm, "gone.test")
    r1 = await sm.send_mail(alice, to=("x@slow.test", "y@slow.test"), subject="waiting")
    r2 = await sm.send_mail(alice, to=("z@gone.test",), subject="doomed")
    slow = await wait_for(lambda: _entry(sm, spb.QUEUE_ENTRY_STATE_DEFERRED, "slow.test"), "slow.test deferred")
    await wait_for(lambda: _entry(sm, spb.QUEUE_ENTRY_STATE_DEFERRED, "gone.test"), "gone.test deferred")
    assert slow.attempts == 1 and "127.0.0.2" in slow.last_reply and slow.subject == "waiting"
    assert slow.message == f"users/{alice}/messages/{r1.message_id}" and slow.mail_from == "alice@example.com"
    assert slow.next_attempt_time.seconds - slow.last_attempt_time.seconds >= 3500
    assert [r.state for r in slow.recipients] == [types_pb2.RECIPIENT_STATE_DEFERRED] * 2
    assert sm.stub is not None
    page1 = await sm.stub.ListQueue(spb.ListQueueRequest(page_size=1), timeout=20)
    page2 = await sm.stub.ListQueue(spb.ListQueueRequest(page_size=1, page_token=page1.next_page_token), timeout=20)
    assert page1.next_page_token and not page2.next_page_token
    assert [e.domain for e in (*page1.entries, *page2.entries)] == ["slow.test", "gone.test"], "oldest first"
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the queue is the operator's
        await sm.stub.ListQueue(spb.ListQueueRequest(), metadata=auth_md(alice), timeout=20)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    opts = _config(sm, tmp_path)
    capsys.readouterr()
    assert await asyncio.to_thread(_cli, ["queue", "list", *opts]) == 0
    out = capsys.readouterr().out
    assert slow.id in out and "deferred" in out and "x@slow.test, y@slow.test" in out and "2 waiting" in out
    assert await asyncio.to_thread(_cli, ["queue", "show", slow.id, *opts]) == 0
    out = capsys.readouterr().out
    for words in ("attempts:      1", "127.0.0.2", "next attempt:", "x@slow.test", "deferred", "waiting"):
        assert words in out, words

    # the server comes back; retry now instead of in an hour
    sm.dns.remove(f"mx.{'slow.test'}")
    sm.dns.add("mx.slow.test", "A", "127.0.0.1", ttl=0)
    assert await asyncio.to_thread(_cli, ["queue", "retry", slow.id, *opts]) == 0
    done = await wait_for(lambda: _entry_by_id(sm, slow.id, spb.QUEUE_ENTRY_STATE_DELIVERED), "retried delivery")
    assert done.attempts == 2 and sorted(sm.sink.messages[0].rcpts) == ["x@slow.test", "y@slow.test"]
    assert await sm.states(alice, r1.message_id) == {"x@slow.test": types_pb2.RECIPIENT_STATE_DELIVERED,
                                                     "y@slow.test": types_pb2.RECIPIENT_STATE_DELIVERED}
    assert await asyncio.to_thread(_cli, ["queue", "retry", slow.id, *opts]) == 1  # finished: nothing to retry
    assert "FAILED_PRECONDITION" in capsys.readouterr().err

    gone = await _entry(sm, spb.QUEUE_ENTRY_STATE_DEFERRED, "gone.test")
    assert gone is not None
    assert await asyncio.to_thread(_cli, ["queue", "cancel", gone.id, *opts]) == 0
    cancelled = await _entry_by_id(sm, gone.id, spb.QUEUE_ENTRY_STATE_CANCELLED)
    assert cancelled is not None and cancelled.recipients[0].state == types_pb2.RECIPIENT_STATE_BOUNCED
    assert await sm.states(alice, r2.message_id) == {"z@gone.test": types_pb2.RECIPIENT_STATE_BOUNCED}
    dsn = await wait_for(lambda: _dsn(sm, alice), "the DSN of the cancelled delivery")
    raw = (await sm.message(alice, dsn.id, types_pb2.MESSAGE_FORMAT_RAW)).raw
    assert b"cancelled by the administrator" in raw and b"z@gone.test" in raw
    assert await asyncio.to_thread(_cli, ["queue", "list", *opts]) == 0
    assert "the outbound queue is empty" in capsys.readouterr().out
    assert await asyncio.to_thread(_cli, ["queue", "show", "nosuch", *opts]) == 1


async def _entry_by_id(sm: SendMesh, job_id: str, state: int) -> spb.QueueEntry | None:
    assert sm.stub is not None
    r = await sm.stub.GetQueueEntry(spb.GetQueueEntryRequest(name=f"queueEntries/{job_id}"), timeout=20)
    return r.entry if r.entry.state == state else None


async def _dsn(sm: SendMesh, user: str) -> types_pb2.Message | None:
    found = [m for m in await sm.label(user, "INBOX") if m.subject.startswith("Undelivered Mail")]
    return found[0] if found else None
