"""Real-time push (WebSocket /v1/events) and GET /v1/history, over real loopback HTTP and
WebSocket against the in-process mesh (mailbox, search, send, gateway, real nats-server).

Changes are made the way other clients make them (MailboxService over gRPC as the user, or the
REST API); events are read with the `websockets` client, history with httpx."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio
from mailmesh.v1 import mailbox_service_pb2 as mpb
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from svc_gateway import push
from tests.svc_gateway.conftest import Gateway, raw_message, start_gateway, stop_gateway
from tests.svc_mailbox.conftest import module_nats_url  # noqa: F401

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT_S = 15.0  # generous bound for anything to arrive on a loaded machine
RETENTION = 30  # changelog entries kept per mailbox in this module's mesh


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory, module_nats_url: str) -> AsyncIterator[Gateway]:  # noqa: F811
    """G1's gateway mesh, with a short changelog so that "too old" history ids can be reached."""
    gw = await start_gateway(tmp_path_factory.mktemp("gwpush"), module_nats_url, changelog_retention=RETENTION)
    try:
        yield gw
    finally:
        await stop_gateway(gw)


# --- helpers ----------------------------------------------------------------------------------

def ws_url(gw: Gateway, since: int | str | None = None, extra: str = "") -> str:
    url = gw.base_url.replace("http://", "ws://") + "/v1/events"
    params = [p for p in ((f"since={since}" if since is not None else ""), extra) if p]
    return url + ("?" + "&".join(params) if params else "")


async def open_events(gw: Gateway, token: str | None, since: int | str | None = None, *,
                      extra: str = "", ready: bool = True) -> tuple[ClientConnection, list[dict[str, Any]]]:
    """A connected /v1/events socket (token as the `bearer, <token>` subprotocol pair) and, when
    `ready`, the frames received up to and including {"type": "ready"}."""
    protos = [Subprotocol("bearer"), Subprotocol(token)] if token else None
    ws = await connect(ws_url(gw, since, extra), subprotocols=protos, proxy=None, open_timeout=WAIT_S)
    frames: list[dict[str, Any]] = []
    if ready:
        while True:
            frame = await next_frame(ws)
            frames.append(frame)
            if frame["type"] == "ready":
                break
    return ws, frames


async def next_frame(ws: ClientConnection, within: float = WAIT_S) -> dict[str, Any]:
    data = await asyncio.wait_for(ws.recv(), within)
    frame = json.loads(data)
    assert isinstance(frame, dict)
    return frame


async def changes_until(ws: ClientConnection, done: Callable[[list[dict[str, Any]]], bool],
                        within: float = WAIT_S) -> list[dict[str, Any]]:
    """Change events (heartbeats and pongs left out) until `done(events)`; fails after `within`."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    while not done(got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {within}s; got {got}")
        frame = await next_frame(ws, left)
        if frame["type"] not in ("heartbeat", "pong", "ready"):
            got.append(frame)
    return got


async def closed_with(ws: ClientConnection, within: float = WAIT_S) -> tuple[int, str]:
    """Reads until the server closes the socket; its close code and reason."""
    deadline = time.monotonic() + within
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the socket was not closed within {within}s")
            await asyncio.wait_for(ws.recv(), left)
    rcvd = closed.value.rcvd
    assert rcvd is not None, "the connection dropped without a close frame"
    return rcvd.code, rcvd.reason


def history_ids(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["historyId"]) for e in events]


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = WAIT_S) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


class Actor:
    """Changes one user's mailbox through MailboxService, as that user."""

    def __init__(self, gw: Gateway, user_id: str) -> None:
        self.gw = gw
        self.user_id = user_id
        self.n = 0

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return self.gw.mesh.md(self.user_id)

    async def add(self, subject: str = "") -> str:
        self.n += 1
        raw = raw_message(subject or f"push test {self.n}", message_id=f"push-{self.user_id}-{self.n}@remote.test")
        return await self.gw.append(self.user_id, raw)

    async def modify(self, ids: list[str], **kw: Any) -> None:
        await self.gw.mesh.stub.BatchModifyMessages(mpb.BatchModifyMessagesRequest(parent="users/me", ids=ids, **kw),
                                                    metadata=self.md)

    async def highest(self) -> int:
        r = await self.gw.mesh.stub.GetAccount(mpb.GetAccountRequest(name="users/me"), metadata=self.md)
        return int(r.account.highest_modseq)


def hub(gw: Gateway) -> push.PushHub:
    return push.hub_of(gw.ctxs[-1].components["app"])


# --- WebSocket: live events -----------------------------------------------------------------------

async def test_socket_receives_a_delivered_message_at_once(gateway: Gateway) -> None:
    users = await gateway.user_token("alice", "bob")
    (alice, token), (_, bob_token) = users["alice"], users["bob"]
    ws, frames = await open_events(gateway, token)
    try:
        assert ws.subprotocol == "bearer"
        assert frames == [{"type": "ready", "historyId": str(await Actor(gateway, alice.user_id).highest())}]
        # a message delivered to alice (as the mailbox's delivery path stores it)
        msg_id = await Actor(gateway, alice.user_id).add("live one")
        [event] = await changes_until(ws, lambda ev: len(ev) >= 1)
        assert event["type"] == "messageAdded"
        assert event["message"]["id"] == msg_id and event["message"]["labelIds"] == ["INBOX"]
        assert event["unread"] is True and int(event["historyId"]) == int(frames[0]["historyId"]) + 1
        # mail sent by bob through REST arrives in alice's INBOX through svc_send and INBOUND
        async with gateway.client(bob_token) as http:
            r = await http.post("/v1/messages", json={"to": [{"email": alice.email}], "subject": "from bob",
                                                         "textBody": "hi"})
        assert r.status_code == 202, r.text
        [delivered] = await changes_until(ws, lambda ev: any(e["type"] == "messageAdded" for e in ev), within=30)
        assert delivered["type"] == "messageAdded" and "INBOX" in delivered["message"]["labelIds"]
        assert int(delivered["historyId"]) == int(event["historyId"]) + 1
    finally:
        await ws.close()


async def test_each_socket_sees_only_its_own_users_events(gateway: Gateway) -> None:
    users = await gateway.user_token("alice", "bob")
    (alice, a_token), (bob, b_token) = users["alice"], users["bob"]
    a, b = Actor(gateway, alice.user_id), Actor(gateway, bob.user_id)
    ws_a, _ = await open_events(gateway, a_token)
    ws_b, _ = await open_events(gateway, b_token)
    ws_a2, _ = await open_events(gateway, a_token)  # a second device of alice's
    try:
        a_ids = [await a.add() for _ in range(3)]
        b_ids = [await b.add() for _ in range(2)]
        await a.modify(a_ids, unread=False)
        await b.modify(b_ids, starred=True)

        def ids(events: list[dict[str, Any]]) -> set[str]:
            return {e["message"]["id"] for e in events}
        got_a = await changes_until(ws_a, lambda ev: len(ev) >= 6)
        got_a2 = await changes_until(ws_a2, lambda ev: len(ev) >= 6)
        got_b = await changes_until(ws_b, lambda ev: len(ev) >= 4)
        assert got_a == got_a2
        assert ids(got_a) == set(a_ids) and ids(got_b) == set(b_ids)
        assert history_ids(got_a) == list(range(history_ids(got_a)[0], history_ids(got_a)[0] + 6))
        assert [e["type"] for e in got_b] == ["messageAdded"] * 2 + ["labelsChanged"] * 2
        # a marker change for each: nothing foreign arrived in between
        marker_a, marker_b = await a.add(), await b.add()
        assert ids(await changes_until(ws_a, lambda ev: len(ev) >= 1)) == {marker_a}
        assert ids(await changes_until(ws_b, lambda ev: len(ev) >= 1)) == {marker_b}
    finally:
        for ws in (ws_a, ws_b, ws_a2):
            await ws.close()


async def test_label_flag_and_delete_events(gateway: Gateway) -> None:
    (alice, token) = (await gateway.user_token("alice"))["alice"]
    a = Actor(gateway, alice.user_id)
    ws, _ = await open_events(gateway, token)
    try:
        msg = await a.add()
        async with gateway.client(token) as http:
            r = await http.post("/v1/labels", json={"name": "Receipts"})
            assert r.status_code == 200, r.text
            label = r.json()["id"]
            r = await http.post(f"/v1/messages/{msg}/modify", json={"addLabelIds": [label], "removeLabelIds": ["INBOX"]})
            assert r.status_code == 200, r.text
            r = await http.post(f"/v1/messages/{msg}/modify", json={"unread": False})
            assert r.status_code == 200, r.text
            r = await http.post(f"/v1/messages/{msg}/trash")
            assert r.status_code == 200, r.text
            r = await http.delete(f"/v1/messages/{msg}")
            assert r.status_code in (200, 204), r.text
        events = await changes_until(ws, lambda ev: any(e["type"] == "messageDeleted" for e in ev))
        assert [e["type"] for e in events] == ["messageAdded", "labelCreated", "labelsChanged", "flagsChanged",
                                               "labelsChanged", "messageDeleted"]
        added, created, moved, read, trashed, deleted = events
        assert created["label"] == {"id": label}
        assert moved["message"]["id"] == msg and moved["addedLabelIds"] == [label]
        assert moved["removedLabelIds"] == ["INBOX"] and moved["message"]["labelIds"] == [label]
        assert read["unread"] is False and read["message"]["id"] == msg
        assert trashed["addedLabelIds"] == ["TRASH"]
        assert deleted["message"] == {"id": msg, "threadId": added["message"]["threadId"]}
        assert history_ids(events) == list(range(history_ids(events)[0], history_ids(events)[0] + 6))
    finally:
        await ws.close()


async def test_reconnect_with_since_gets_exactly_the_missed_events(gateway: Gateway) -> None:
    (alice, token) = (await gateway.user_token("alice"))["alice"]
    a = Actor(gateway, alice.user_id)
    ws, _ = await open_events(gateway, token)
    first = [await a.add() for _ in range(2)]
    seen = await changes_until(ws, lambda ev: len(ev) >= 2)
    last = int(seen[-1]["historyId"])
    await ws.close()
    # while disconnected
    missed = [await a.add() for _ in range(3)]
    await a.modify(first + missed, starred=True)
    top = await a.highest()
    assert top == last + 8

    ws, frames = await open_events(gateway, token, since=last)
    try:
        replayed = [f for f in frames if f["type"] != "ready"]
        assert history_ids(replayed) == list(range(last + 1, top + 1))
        assert [e["message"]["id"] for e in replayed[:3]] == missed
        assert frames[-1] == {"type": "ready", "historyId": str(top)}
        # then live, continuing the same sequence
        live = await a.add()
        [event] = await changes_until(ws, lambda ev: len(ev) >= 1)
        assert event["message"]["id"] == live and int(event["historyId"]) == top + 1
    finally:
        await ws.close()


async def test_resume_while_changes_keep_coming_has_no_gap_and_no_repeat(gateway: Gateway) -> None:
    """Changes committed during the replay (the seam between changelog and live events) arrive
    exactly once, in history id order."""
    (alice, token) = (await gateway.user_token("alice"))["alice"]
    a = Actor(gateway, alice.user_id)
    ids = [await a.add() for _ in range(12)]
    start = await a.highest() - 12

    async def writer() -> None:
        for i in range(20):
            await a.modify([ids[i % len(ids)]], unread=bool(i % 2))
    task = asyncio.create_task(writer())
    try:
        ws, frames = await open_events(gateway, token, since=start)
        await task
        top = await a.highest()
        events = [f for f in frames if f["type"] != "ready"]
        if not events or int(events[-1]["historyId"]) < top:
            events += await changes_until(ws, lambda ev: bool(ev) and int(ev[-1]["historyId"]) >= top)
        assert history_ids(events) == list(range(start + 1, top + 1))
        await ws.close()
    finally:
        await task


async def test_no_event_is_repeated_across_many_reconnects(gateway: Gateway) -> None:
    (alice, token) = (await gateway.user_token("alice"))["alice"]
    a = Actor(gateway, alice.user_id)
    last = await a.highest()
    received: list[int] = []
    for round_ in range(4):
        ws, frames = await open_events(gateway, token, since=last)
        received += history_ids([f for f in frames if f["type"] != "ready"])
        await a.add(f"round {round_}")
        received += history_ids(await changes_until(ws, lambda ev: len(ev) >= 1))
        last = received[-1]
        await ws.close()
        await a.add(f"offline {round_}")
    assert received == list(range(received[0], received[0] + len(received)))
    assert len(received) == 7  # 4 live + 3 replayed (the last offline change is not fetched)


# --- WebSocket: authentication, bad input and limits --------------------------------------------

async def test_missing_bad_or_revoked_token_is_closed_with_1008(gateway: Gateway) -> None:
    (alice, token) = (await gateway.user_token("alice"))["alice"]
    ws, _ = await open_events(gateway, None, ready=False)
    code, reason = await closed_with(ws)
    assert code == 1008 and "bearer" in reason
    ws, _ = await open_events(gateway, "not-a-real-token", ready=False)
    assert (await closed_with(ws))[0] == 1008
    # the query-parameter form is not a way in: tokens stay out of URLs
    ws, _ = await open_events(gateway, None, extra=f"access_token={token}", ready=False)
    assert (await closed_with(ws))[0] == 1008
    # a revoked token
    async with gateway.client() as http:
        other = await gateway.login(alice.email)
        r = await http.post("/v1/auth/logout", headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 204, r.text
    ws, _ = await open_events(gateway, other, ready=False)
    assert (await closed_with(ws))[0] == 1008
    # the valid one still works
    ws, frames = await open_events(gateway, token)
    assert frames[-1]["type"] == "ready"
    await ws.close()


async def test_logout_ends_an_open_socket_at_the_next_heartbeat(gateway: Gateway) -> None:
    (alice, token) = (await gateway.user_token("alice"))["alice"]
    h = hub(gateway)
    saved = h.config
    h.config = push.PushConfig(heartbeat_s=0.3)
    try:
        ws, frames = await open_events(gateway, token)
        beat = await next_frame(ws)
        assert beat == {"type": "heartbeat", "historyId": frames[-1]["historyId"]}
        await ws.send(json.dumps({"type": "ping"}))
        while (frame := await next_frame(ws))["type"] == "heartbeat":
            pass
        assert frame == {"type": "pong"}
        async with gateway.client(token) as http:
            assert (await http.post("/v1/auth/logout")).status_code == 204
        code, reason = await closed_with(ws)
        assert code == 1008 and "revoked" in reason
    finally:
        h.config = saved


async def test_bad_or_out_of_range_since(gateway: Gateway) -> None:
    (alice, token) = (await gateway.user_token("alice"))["alice"]
    a = Actor(gateway, alice.user_id)
    for bad in ("abc", "-1", "1.5", "99999999999999999999"):
        ws, _ = await open_events(gateway, token, since=bad, ready=False)
        code, reason = await closed_with(ws)
        assert code == 4400 and "since" in reason, (bad, code, reason)
    # newer than the mailbox
    ws, _ = await open_events(gateway, token, since=await a.highest() + 5, ready=False)
    code, reason = await closed_with(ws)
    assert code == 4404 and "full sync" in reason
    # older than the retained changelog
    ids = [await a.add() for _ in range(RETENTION + 5)]
    await a.modify(ids, unread=False)

    async def trimmed() -> bool:
        async with gateway.client(token) as http:
            return (await http.get("/v1/history", params={"since": 1})).status_code == 404
    await eventually(trimmed, "the changelog to be trimmed")
    ws, _ = await open_events(gateway, token, since=1, ready=False)
    code, reason = await closed_with(ws)
    assert code == 4404 and "full sync" in reason


async def test_sockets_per_user_are_bounded(gateway: Gateway) -> None:
    users = await gateway.user_token("alice", "bob")
    (_, token), (_, bob_token) = users["alice"], users["bob"]
    h = hub(gateway)
    saved = h.config
    h.config = push.PushConfig(max_sockets_per_user=2)
    opened: list[ClientConnection] = []
    try:
        for _ in range(2):
            opened.append((await open_events(gateway, token))[0])
        extra, _ = await open_events(gateway, token, ready=False)
        code, reason = await closed_with(extra)
        assert code == 4429 and "too many sockets" in reason
        opened.append((await open_events(gateway, bob_token))[0])  # other users are not affected
        # a closed socket frees its place
        await opened.pop(0).close()

        async def freed() -> bool:
            return h.sockets_of(users["alice"][0].user_id) < 2
        await eventually(freed, "the closed socket to be released")
        opened.append((await open_events(gateway, token))[0])
    finally:
        h.config = saved
        for ws in opened:
            await ws.close()


async def test_a_client_that_falls_behind_is_closed_not_buffered(gateway: Gateway) -> None:
    """More events waiting for one socket than its queue holds (a burst of 25 with room for 1):
    the socket is closed with 4408 and a reason saying how to resume, rather than buffering; a
    reconnect with since= then gets every event after the last one received."""
    (alice, token) = (await gateway.user_token("alice"))["alice"]
    a = Actor(gateway, alice.user_id)
    ws, frames = await open_events(gateway, token)
    ids = [await a.add() for _ in range(25)]
    received = await changes_until(ws, lambda ev: len(ev) >= 25)  # all published and delivered
    h = hub(gateway)
    saved = h.config
    h.config = push.PushConfig(send_queue=1)
    try:
        await a.modify(ids, starred=True)  # 25 events published at once
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                received.append(await next_frame(ws))
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4408 and "since" in closed.value.rcvd.reason
    finally:
        h.config = saved
    # it resumes after the last history id it received
    since = int(received[-1]["historyId"])
    ws, frames = await open_events(gateway, token, since=since)
    top = await a.highest()
    events = [f for f in frames if f["type"] != "ready"]
    assert history_ids(events) == list(range(since + 1, top + 1))
    await ws.close()


async def test_gateway_shutdown_closes_sockets_cleanly(tmp_path_factory: pytest.TempPathFactory,
                                                      module_nats_url: str) -> None:  # noqa: F811
    gw = await start_gateway(tmp_path_factory.mktemp("gwstop"), module_nats_url)
    stopped = False
    try:
        (_, token) = (await gw.user_token("alice"))["alice"]
        ws, _ = await open_events(gw, token)
        await stop_gateway(gw)
        stopped = True
        code, _ = await closed_with(ws)
        assert code in (1001, 1012)  # going away / service restart: reconnect with since
    finally:
        if not stopped:
            await stop_gateway(gw)


# --- GET /v1/history ----------------------------------------------------------------------------

async def test_history_pages_through_every_change_once(gateway: Gateway) -> None:
    (alice, token) = (await gateway.user_token("alice"))["alice"]
    a = Actor(gateway, alice.user_id)
    start = await a.highest()
    ids = [await a.add() for _ in range(5)]
    await a.modify(ids[:2], add_label_ids=["IMPORTANT"])
    await a.modify(ids[2:3], unread=False)
    top = await a.highest()
    got: list[dict[str, Any]] = []
    pages = 0
    async with gateway.client(token) as http:
        params: dict[str, Any] = {"since": start, "maxResults": 3}
        while True:
            r = await http.get("/v1/history", params=params)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["historyId"] == str(top)
            got += body["history"]
            pages += 1
            if "nextPageToken" not in body:
                break
            params["pageToken"] = body["nextPageToken"]
    assert pages == 3
    assert [int(h["id"]) for h in got] == list(range(start + 1, top + 1))
    assert [h["type"] for h in got] == ["messageAdded"] * 5 + ["labelsChanged"] * 2 + ["flagsChanged"]
    assert got[0]["messagesAdded"][0]["message"]["id"] == ids[0]
    assert got[0]["messages"] == [{"id": ids[0], "threadId": got[0]["messagesAdded"][0]["message"]["threadId"]}]
    assert got[5]["labelsAdded"][0]["labelIds"] == ["IMPORTANT"]
    assert got[7]["flagsChanged"][0]["unread"] is False
    # nothing after the latest
    async with gateway.client(token) as http:
        r = await http.get("/v1/history", params={"since": top})
    assert r.status_code == 200 and r.json() == {"history": [], "historyId": str(top)}


async def test_history_is_per_user_and_needs_a_token(gateway: Gateway) -> None:
    users = await gateway.user_token("alice", "bob")
    (alice, a_token), (_, b_token) = users["alice"], users["bob"]
    a = Actor(gateway, alice.user_id)
    for _ in range(4):
        await a.add()
    async with gateway.client(a_token) as http:
        r = await http.get("/v1/history", params={"since": 0, "maxResults": 2})
    assert r.status_code == 200 and r.json()["nextPageToken"]
    alice_page = r.json()["nextPageToken"]
    async with gateway.client(b_token) as http:
        r = await http.get("/v1/history", params={"since": 0})
        assert r.status_code == 200
        assert r.json()["history"] == [] and r.json()["historyId"] == "0"
        # alice's page token is not bob's
        r = await http.get("/v1/history", params={"since": 0, "pageToken": alice_page})
        assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_REQUEST"
    async with gateway.client() as http:
        r = await http.get("/v1/history", params={"since": 0})
    assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"


async def test_history_bad_input_is_400(gateway: Gateway) -> None:
    (alice, token) = (await gateway.user_token("alice"))["alice"]
    a = Actor(gateway, alice.user_id)
    for _ in range(3):
        await a.add()
    async with gateway.client(token) as http:
        r = await http.get("/v1/history", params={"since": 0, "maxResults": 1})
        good = r.json()["nextPageToken"]
        tampered = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
        cases: list[dict[str, str | int]] = [
            {}, {"since": "abc"}, {"since": -1}, {"since": "1e3"}, {"since": 0, "maxResults": 0},
            {"since": 0, "maxResults": 501}, {"since": 0, "pageToken": tampered},
            {"since": 0, "pageToken": "x" * 600}, {"since": 1, "pageToken": good}]
        for params in cases:
            r = await http.get("/v1/history", params=params)
            assert r.status_code == 400, (params, r.status_code, r.text)
            assert r.json()["error"]["code"] == "INVALID_REQUEST" and r.json()["error"]["message"]


async def test_history_too_old_or_too_new_is_404_full_sync(gateway: Gateway) -> None:
    (alice, token) = (await gateway.user_token("alice"))["alice"]
    a = Actor(gateway, alice.user_id)
    ids = [await a.add() for _ in range(RETENTION)]
    await a.modify(ids, starred=True)
    top = await a.highest()
    async with gateway.client(token) as http:
        async def trimmed() -> bool:
            return (await http.get("/v1/history", params={"since": 2})).status_code == 404
        await eventually(trimmed, "the relay to trim the changelog")
        r = await http.get("/v1/history", params={"since": 2})
        assert r.json()["error"]["code"] == "NOT_FOUND" and "full sync" in r.json()["error"]["message"]
        # the retained tail still pages without a gap
        r = await http.get("/v1/history", params={"since": top - RETENTION + 1, "maxResults": 500})
        assert r.status_code == 200, r.text
        assert [int(h["id"]) for h in r.json()["history"]] == list(range(top - RETENTION + 2, top + 1))
        r = await http.get("/v1/history", params={"since": top + 1})
        assert r.status_code == 404 and "full sync" in r.json()["error"]["message"]


# --- tracing --------------------------------------------------------------------------------------



async def test_push_joins_the_trace_of_the_change(gateway: Gateway, spans: InMemorySpanExporter) -> None:
    (alice, token) = (await gateway.user_token("alice"))["alice"]
    ws, _ = await open_events(gateway, token)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = await gateway.mesh.stub.AppendMessage(
        mpb.AppendMessageRequest(parent="users/me", raw=raw_message("traced"), label_ids=["INBOX"]),
        metadata=(*gateway.mesh.md(alice.user_id), ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")))
    [event] = await changes_until(ws, lambda ev: len(ev) >= 1)
    assert event["message"]["id"] == r.message.id
    await ws.close()

    async def finished() -> bool:
        names = {s.name for s in spans.get_finished_spans()}
        return {"events.push", "push.session"} <= names
    await eventually(finished, "the push spans")
    pushed = [s for s in spans.get_finished_spans() if s.name == "events.push"
              and s.attributes and s.attributes.get("mailmesh.user_id") == alice.user_id]
    assert any(format(s.context.trace_id, "032x") == trace_id for s in pushed)
    session = [s for s in spans.get_finished_spans() if s.name == "push.session"
               and s.attributes and s.attributes.get("mailmesh.user_id") == alice.user_id]
    assert session and session[0].attributes and session[0].attributes["mailmesh.push.events_sent"] == 1
