"""A delivery worker that dies (SIGKILL of a real `python -m svc_send`) or is stopped while the
remote server is in the middle of DATA loses nothing and delivers once: the message is taken
over after its ack wait and its lease, and the remote server gets exactly one copy."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import send_service_pb2_grpc as spb_grpc
from mailmesh.v1 import types_pb2

from mailmesh_common import grpcclient
from mailmesh_common.config import settings_env
from tests.conftest import REPO
from tests.svc_send.conftest import REMOTE, SendMesh, auth_md, wait_for


async def _delivered(sm: SendMesh, user: str, msg_id: str) -> bool:
    return (await sm.states(user, msg_id)).get(f"dave@{REMOTE}") == types_pb2.RECIPIENT_STATE_DELIVERED


async def _serving(addr: str) -> bool:
    async with grpc.aio.insecure_channel(addr) as ch:
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.aio.AioRpcError:
            return False
        return r.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.send_settings(outbound_ack_wait_s=1)
async def test_killed_worker_loses_nothing_and_delivers_once(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    await sm.stop()
    assert sm.settings is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILMESH_")}
    env.update(settings_env(sm.settings))
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "svc_send"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        addr = sm.settings.addr("send")
        await wait_for(lambda: _serving(addr), "svc_send (subprocess) to serve")
        sm.sink.hold = asyncio.Event()  # the remote server sits in DATA
        channel = grpcclient.channel(addr, sm.settings)
        try:
            r = await spb_grpc.SendServiceStub(channel).Send(spb.SendRequest(
                parent="users/me", to=[types_pb2.Address(email=f"dave@{REMOTE}")], subject="survivor",
                text_body="hi"), metadata=auth_md(alice), timeout=30)
        finally:
            await channel.close()
        await asyncio.wait_for(sm.sink.data_started.wait(), 30)
        proc.kill()  # mid-DATA: the reply to the final dot never reaches the worker
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    await wait_for(lambda: _abandoned(sm), "the remote to notice the client is gone")
    assert sm.sink.messages == []
    sm.sink.hold.set()
    started = time.monotonic()
    await sm.start(outbound_ack_wait_s=1)
    await wait_for(lambda: _delivered(sm, alice, r.message_id), "delivery by the new worker")
    assert time.monotonic() - started < 20
    await asyncio.sleep(0.5)  # nothing else comes
    assert len(sm.sink.messages) == 1 and sm.sink.messages[0].rcpts == [f"dave@{REMOTE}"]


async def _abandoned(sm: SendMesh) -> bool:
    return sm.sink.abandoned > 0


@pytest.mark.send_settings(outbound_ack_wait_s=60)
async def test_stopped_worker_hands_the_message_back_and_delivers_once(sm: SendMesh) -> None:
    alice = sm.users["alice"]
    sm.sink.hold = asyncio.Event()
    r = await sm.send_mail(alice, to=(f"dave@{REMOTE}",), subject="handover")
    await asyncio.wait_for(sm.sink.data_started.wait(), 30)
    await sm.stop()  # graceful: the worker gives up its lease and naks the message
    await wait_for(lambda: _abandoned(sm), "the remote to notice the client is gone")
    assert sm.sink.messages == []
    sm.sink.hold.set()
    started = time.monotonic()
    await sm.start(outbound_ack_wait_s=60)
    await wait_for(lambda: _delivered(sm, alice, r.message_id), "delivery after the restart", timeout=45)
    assert time.monotonic() - started < 45, "handed back at once, not after the 60 s ack wait and lease"
    await asyncio.sleep(0.5)
    assert len(sm.sink.messages) == 1
