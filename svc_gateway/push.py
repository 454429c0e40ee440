"""Real-time push and history for REST clients: the WebSocket `/v1/events` and `GET /v1/history`.

`GET /v1/history?since=<historyId>[&maxResults=1..500][&pageToken=]` (Bearer auth) lists the
user's changes after a history id (the mailbox MODSEQ), oldest first, in pages:
`{"history": [...], "historyId": "<current>", "nextPageToken": "..."}` (records: see
`svc_gateway/history.py`). A `since` older than the retained changelog
(MAILMESH_CHANGELOG_RETENTION changes), or newer than the mailbox's current history id, is a 404
telling the client to do a full sync, as Gmail does; a malformed one is a 400.

WebSocket `/v1/events[?since=<historyId>]`:
- Authentication: browsers cannot set headers on a WebSocket, so the bearer token travels as a
  subprotocol pair: `Sec-WebSocket-Protocol: bearer, <token>` (JavaScript:
  `new WebSocket(url, ["bearer", token])`); the gateway echoes `bearer`. Tokens never appear in
  URLs (no access logs, no Referer), and since no cookie is involved a foreign page cannot open
  a socket for a signed-in user. A missing, unknown, expired or revoked token: the socket is
  closed with 1008 (policy violation). The token is checked again at every heartbeat, so a
  logout or expiry ends the socket (1008) too.
- Frames (JSON text, server to client): change events
  `{"type": "messageAdded"|"labelsChanged"|"flagsChanged"|"messageDeleted"|"labelCreated"|...,
  "historyId": "42", ...}` (see `svc_gateway/history.py`), only ever the user's own, in history
  id order and each once; `{"type": "ready", "historyId"}` once the replay after `since` is done
  (or at once without `since`: events follow from the current history id); `{"type":
  "heartbeat", "historyId"}` after `heartbeat_s` without traffic (its history id is the last one
  delivered); `{"type": "pong"}` in answer to a client's `{"type": "ping"}`. Other client frames
  are ignored. WebSocket protocol pings are uvicorn's (ws_ping_interval).
- Resume: reconnect with `?since=<the last historyId received>`: the gateway replays the changes
  after it from the changelog (MailboxService.ListChanges), then switches to live events from
  JetStream `EVENTS` without a gap or a repeat: the live subscription starts before the replay
  reads the changelog, and events are deduplicated and ordered by history id across the seam; a
  live event that skips ids (missed while NATS reconnected) is filled in from the changelog.
- Close codes: 1008 unauthenticated; 4400 bad `since`; 4404 `since` no longer (or not yet) in
  the changelog: do a full sync, then reconnect without `since`; 4429 too many sockets for this
  user (`max_sockets_per_user` per gateway) or rate limited; 4408 the client does not read fast
  enough (more than `send_queue` live events waiting, or one frame not accepted within
  `send_timeout_s`): reconnect with `since` (while a replay runs, queued live events beyond
  `send_queue` are dropped instead and the changelog is read again after it); 1013 the mailbox
  or NATS is unavailable: retry later; 1001 (or uvicorn's 1012) the gateway is shutting down:
  reconnect with `since`.

Live events: one JetStream ordered consumer (ephemeral, memory, no acks) per user with at least
one socket on this gateway, filtered to the user's subject `mailbox.events.<user_id>`, fanning
out to that user's sockets; it starts at the user's last stored event (DeliverPolicy
LAST_PER_SUBJECT) so that nats-py's automatic consumer resets resume from a real stream position
rather than from the start of the stream. Each socket has a bounded queue; nothing grows without bound for a slow client.

Spans: `push.session` (the life of one socket), `events.push` (CONSUMER, one per EVENTS message,
parented by the producer's `traceparent` header), plus the gRPC client spans of the replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Depends, FastAPI, Query, Request, WebSocket
from google.protobuf.message import DecodeError
from mailmesh.v1 import events_pb2, types_pb2
from mailmesh.v1 import mailbox_service_pb2 as pb
from nats.aio.msg import Msg
from nats.js import api as js_api
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.websockets import WebSocketDisconnect, WebSocketState

from mailmesh_common import streams, telemetry
from mailmesh_common.config import Settings
from svc_gateway import history
from svc_gateway.deps import current_user, grpc_metadata, websocket_user
from svc_gateway.errors import ApiError, from_grpc, not_found
from svc_gateway.rest.common import ERRORS
from svc_gateway.state import GatewayState
from svc_gateway.tokens import TokenInfo

log = logging.getLogger(__name__)

# close codes (RFC 6455 7.4.1; 4000-4999 are the application's)
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013
CLOSE_BAD_REQUEST = 4400
CLOSE_SLOW_CLIENT = 4408
CLOSE_FULL_SYNC = 4404
CLOSE_TOO_MANY = 4429

SUBPROTOCOL = "bearer"
RPC_TIMEOUT_S = 10.0
MAX_CLOSE_REASON = 120  # RFC 6455 5.5: control frame payload <= 125 bytes
MAX_HISTORY_ID = 2**63 - 1


@dataclass(frozen=True)
class PushConfig:
    """Limits of the push; read from Settings when it has the `gateway_ws_*` fields."""

    max_sockets_per_user: int = 10  # per gateway process
    send_queue: int = 1000  # events waiting for one socket before it is closed as too slow
    send_timeout_s: float = 10.0  # one frame not taken by the client within this: too slow
    heartbeat_s: float = 25.0  # an application heartbeat (and token re-check) after this much quiet
    replay_page: int = 500  # ListChanges page size while replaying
    close_timeout_s: float = 5.0  # how long a close handshake may take

    @classmethod
    def from_settings(cls, settings: Settings) -> PushConfig:
        d = cls()
        return cls(
            max_sockets_per_user=settings.gateway_ws_max_sockets_per_user or d.max_sockets_per_user,
            send_queue=settings.gateway_ws_send_queue or d.send_queue,
            send_timeout_s=settings.gateway_ws_send_timeout_s or d.send_timeout_s,
            heartbeat_s=settings.gateway_ws_heartbeat_s or d.heartbeat_s,
        )


class SessionClosed(Exception):
    """Ends a socket with a close code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason[:MAX_CLOSE_REASON]


# --- GET /v1/history ------------------------------------------------------------------------------

def _full_sync(since: int, detail: str) -> ApiError:
    return not_found(f"history id {since} {detail}; do a full sync (list messages), then continue from the "
                     "historyId of a later response")


async def list_changes(gw: GatewayState, user: TokenInfo, since: int, size: int) -> pb.ListChangesResponse:
    """One page of the user's changes after `since`; ApiError (404 "do a full sync" when `since`
    is no longer, or not yet, in the changelog)."""
    try:
        resp: pb.ListChangesResponse = await gw.mailbox.ListChanges(
            pb.ListChangesRequest(parent="users/me", since_modseq=since, page_size=size),
            metadata=grpc_metadata(user), timeout=RPC_TIMEOUT_S)
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
            # the only precondition of ListChanges: `since` is within the retained changelog
            raise _full_sync(since, "is older than the history this mailbox keeps") from None
        raise from_grpc(err) from None
    if since > resp.highest_modseq:
        raise _full_sync(since, f"is newer than this mailbox's current history id {resp.highest_modseq}")
    return resp


def _tokens(gw: GatewayState) -> history.HistoryTokens:
    return history.HistoryTokens(gw.settings.token())


# the error statuses GET /v1/history answers (documented with the gateway's error body)
router_responses: dict[int | str, dict[str, Any]] = {
    k: v for k, v in ERRORS.items() if k in (400, 401, 404, 429, 503)}
router_responses[404] = {**ERRORS[404], "description": "NOT_FOUND: `since` is older than the history this "
                         "mailbox keeps (or newer than its current history id): do a full sync"}


async def _history(request: Request,
                   user: Annotated[TokenInfo, Depends(current_user)],
                   since: Annotated[int, Query(ge=0, le=MAX_HISTORY_ID,
                                               description="return the changes after this history id")],
                   maxResults: Annotated[int, Query(ge=1, le=history.MAX_PAGE)] = history.DEFAULT_PAGE,  # noqa: N803
                   pageToken: Annotated[str, Query(max_length=history.MAX_TOKEN_CHARS)] = "",  # noqa: N803
                   ) -> dict[str, Any]:
    gw: GatewayState = request.app.state.gw
    with telemetry.tracer().start_as_current_span("gateway.history", attributes={
            "mailmesh.user_id": user.user_id, "mailmesh.history.since": since}):
        position = _tokens(gw).decode(pageToken, user.user_id, since) if pageToken else since
        resp = await list_changes(gw, user, position, maxResults)
        out: dict[str, Any] = {"history": [history.record_json(c) for c in resp.changes],
                               "historyId": str(resp.highest_modseq)}
        if resp.has_more and resp.changes:
            out["nextPageToken"] = _tokens(gw).encode(user.user_id, since, resp.changes[-1].modseq)
        return out


# --- live events: one ordered consumer per user, fanned out to that user's sockets ---------------

class Feed:
    """The live EVENTS of one user on this gateway, delivered to each of the user's sessions."""

    def __init__(self, hub: PushHub, user_id: str) -> None:
        self.hub = hub
        self.user_id = user_id
        self.sessions: set[Session] = set()
        self.high = 0  # highest history id delivered to the sessions
        self.sub: Any = None
        self.started: asyncio.Future[None] | None = None

    async def start(self) -> None:
        nc = self.hub.gw.nats
        if nc is None or not nc.is_connected:
            raise SessionClosed(CLOSE_TRY_LATER, "live events are unavailable (no NATS connection); retry later")
        js = nc.jetstream(timeout=RPC_TIMEOUT_S)
        try:
            self.sub = await js.subscribe(
                streams.events_subject(self.user_id), stream=streams.EVENTS.name, cb=self._on_msg,
                ordered_consumer=True, deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
                pending_msgs_limit=10_000, pending_bytes_limit=64 * 1024 * 1024)
        except Exception as exc:  # nats raises several unrelated types
            log.warning("push: cannot subscribe to EVENTS for a user: %s: %s", exc.__class__.__name__, exc)
            raise SessionClosed(CLOSE_TRY_LATER, "live events are unavailable; retry later") from None

    async def stop(self) -> None:
        if self.started is not None:
            with contextlib.suppress(BaseException):
                await self.started
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None

    async def _on_msg(self, msg: Msg) -> None:
        with telemetry.consumer_span("events.push", msg.headers, {
                "messaging.system": "nats", "messaging.destination.name": msg.subject,
                "mailmesh.user_id": self.user_id}) as span:
            try:
                change = events_pb2.MailboxEvent.FromString(msg.data).change
            except DecodeError:
                log.error("push: undecodable message on %s", msg.subject)
                span.set_status(Status(StatusCode.ERROR, "undecodable"))
                return
            span.set_attribute("mailmesh.history_id", change.modseq)
            if change.user_id and change.user_id != self.user_id:  # never another user's change
                log.error("push: a change of another user on %s", msg.subject)
                return
            if change.modseq <= self.high:
                # already delivered (a consumer reset or a republish); a session that joined since
                # replayed from the changelog at least up to it
                span.set_attribute("mailmesh.duplicate", True)
                return
            self.high = change.modseq
            span.set_attribute("mailmesh.sockets", len(self.sessions))
            for session in list(self.sessions):
                session.offer(change)


class PushHub:
    """Every push session of this gateway process and the per-user feeds."""

    def __init__(self, gw: GatewayState, config: PushConfig) -> None:
        self.gw = gw
        self.config = config
        self.feeds: dict[str, Feed] = {}
        self.sessions: set[Session] = set()
        self.idle = asyncio.Event()  # set while there is no session
        self.idle.set()
        self.closing = False

    def sockets_of(self, user_id: str) -> int:
        feed = self.feeds.get(user_id)
        return len(feed.sessions) if feed else 0

    async def attach(self, session: Session) -> None:
        """Registers the session with its user's feed (starting it); raises SessionClosed."""
        if self.closing:
            raise SessionClosed(CLOSE_GOING_AWAY, "the gateway is shutting down; reconnect with since")
        if self.sockets_of(session.user.user_id) >= self.config.max_sockets_per_user:
            raise SessionClosed(CLOSE_TOO_MANY, f"too many sockets for this user on this gateway "
                                                f"(max {self.config.max_sockets_per_user})")
        feed = self.feeds.get(session.user.user_id)
        if feed is None:
            feed = Feed(self, session.user.user_id)
            self.feeds[feed.user_id] = feed
            feed.started = asyncio.ensure_future(feed.start())
        feed.sessions.add(session)
        self.sessions.add(session)
        self.idle.clear()
        session.feed = feed
        assert feed.started is not None
        try:
            await asyncio.shield(feed.started)
        except BaseException:
            await self.detach(session)
            raise

    async def detach(self, session: Session) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self.idle.set()
        feed = session.feed
        if feed is None:
            return
        session.feed = None
        feed.sessions.discard(session)
        if not feed.sessions and self.feeds.get(feed.user_id) is feed:
            del self.feeds[feed.user_id]
            await feed.stop()

    async def close(self) -> None:
        """Gateway shutdown: every socket is closed with 1001, then the feeds stop."""
        self.closing = True
        for session in list(self.sessions):
            session.end(CLOSE_GOING_AWAY, "the gateway is shutting down; reconnect with since")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), self.config.close_timeout_s + 1)
        for feed in list(self.feeds.values()):
            await feed.stop()
        self.feeds.clear()


def hub_of(app: Any) -> PushHub:
    hub: PushHub | None = getattr(app.state, "push_hub", None)
    if hub is None:
        gw: GatewayState = app.state.gw
        config = getattr(app.state, "push_config", None) or PushConfig.from_settings(gw.settings)
        hub = PushHub(gw, config)
        app.state.push_hub = hub
    return hub


async def shutdown(app: FastAPI) -> None:
    """Gateway shutdown: closes every socket with 1001 and stops the feeds (call it before the
    HTTP server stops, which would otherwise close the sockets with 1012)."""
    hub: PushHub | None = getattr(app.state, "push_hub", None)
    if hub is not None:
        await hub.close()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Runs `shutdown` when the app's lifespan ends (when it is served with lifespan on)."""
    try:
        yield
    finally:
        await shutdown(app)


# --- one socket -----------------------------------------------------------------------------------

def _since_param(ws: WebSocket) -> int | None:
    raw = ws.query_params.get("since")
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_HISTORY_ID:
        raise SessionClosed(CLOSE_BAD_REQUEST, "since must be a history id (a non-negative integer)")
    return int(raw)


def _offered_token(ws: WebSocket) -> tuple[str | None, bool]:
    """The token of a `bearer, <token>` subprotocol pair and whether `bearer` was offered."""
    offered = [p.strip() for p in ws.scope.get("subprotocols", []) or []]
    for i, proto in enumerate(offered):
        if proto.lower() == SUBPROTOCOL:
            return (offered[i + 1] if i + 1 < len(offered) else None), True
    return None, False


class Session:
    """One authenticated socket: replay after `since`, then live events, heartbeats, close."""

    def __init__(self, hub: PushHub, ws: WebSocket, user: TokenInfo, token: str) -> None:
        self.hub = hub
        self.ws = ws
        self.user = user
        self.token = token
        self.feed: Feed | None = None
        self.pending: deque[types_pb2.Change] = deque()
        self.wake = asyncio.Event()
        self.pong = False
        self.ended: SessionClosed | None = None
        self.stopped = asyncio.Event()
        self.last = 0  # history id of the last change sent (or the starting point)
        self.sent = 0
        self.replaying = False  # reading the changelog: live events are redundant until it ends
        self.lagged = False  # live events were dropped while replaying: read the changelog again

    # called by the feed (never blocks)
    def offer(self, change: types_pb2.Change) -> None:
        if self.ended is not None:
            return
        if len(self.pending) >= self.hub.config.send_queue:
            if self.replaying:
                # the changelog has them: drop the queue and read it again once this replay ends
                self.pending.clear()
                self.lagged = True
                return
            self.end(CLOSE_SLOW_CLIENT, f"client too slow: more than {self.hub.config.send_queue} events waiting; "
                                        "reconnect with since=<the last historyId received>")
            return
        self.pending.append(change)
        self.wake.set()

    def end(self, code: int, reason: str) -> None:
        if self.ended is None:
            self.ended = SessionClosed(code, reason)
        self.stopped.set()

    async def send(self, frame: dict[str, Any]) -> None:
        if self.ended is not None:
            raise self.ended
        data = json.dumps(frame, separators=(",", ":"))
        try:
            await asyncio.wait_for(self.ws.send_text(data), self.hub.config.send_timeout_s)
        except TimeoutError:
            raise SessionClosed(CLOSE_SLOW_CLIENT, f"client too slow: a frame was not taken within "
                                                   f"{self.hub.config.send_timeout_s:g}s; reconnect with "
                                                   "since=<the last historyId received>") from None

    async def send_change(self, change: types_pb2.Change) -> None:
        await self.send(history.event_json(change))
        self.last = change.modseq
        self.sent += 1

    async def catch_up(self, since: int) -> None:
        """Sends every change after `since` from the changelog (all pages, and again from the last
        one sent when live events had to be dropped meanwhile)."""
        self.replaying = True
        try:
            await self._replay(since)
            while self.lagged:
                self.lagged = False
                await self._replay(self.last)
        finally:
            self.replaying = False

    async def _replay(self, since: int) -> None:
        position = since
        while True:
            try:
                resp = await list_changes(self.hub.gw, self.user, position, self.hub.config.replay_page)
            except ApiError as err:
                if err.status == 404:
                    raise SessionClosed(CLOSE_FULL_SYNC, err.message) from None
                if err.status in (400, 401, 403):
                    raise SessionClosed(CLOSE_POLICY if err.status != 400 else CLOSE_BAD_REQUEST,
                                        err.message) from None
                raise SessionClosed(CLOSE_TRY_LATER, "the mailbox is unavailable; retry later") from None
            for change in resp.changes:
                if change.modseq > self.last:
                    await self.send_change(change)
                position = max(position, change.modseq)
            if not resp.has_more or not resp.changes:
                return

    async def current_history_id(self) -> int:
        try:
            resp = await self.hub.gw.mailbox.GetAccount(pb.GetAccountRequest(name="users/me"),
                                                        metadata=grpc_metadata(self.user), timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            api = from_grpc(err)
            if api.status in (401, 403, 404):
                raise SessionClosed(CLOSE_POLICY, "the account is not available") from None
            raise SessionClosed(CLOSE_TRY_LATER, "the mailbox is unavailable; retry later") from None
        return int(resp.account.highest_modseq)

    async def still_authorized(self) -> bool:
        if self.user.expires_at <= time.time():
            return False
        try:
            return await self.hub.gw.tokens.lookup(self.token) is not None
        except Exception:  # a transient store failure does not end a healthy socket
            return True

    async def pump(self, since: int | None) -> None:
        """Replay, `ready`, then live events until the session ends (raises SessionClosed)."""
        if since is None:
            self.last = await self.current_history_id()
        else:
            self.last = since
            await self.catch_up(since)
        await self.send({"type": "ready", "historyId": str(self.last)})
        checked = time.monotonic()
        while True:
            if time.monotonic() - checked >= self.hub.config.heartbeat_s:  # also on a busy socket
                checked = time.monotonic()
                if not await self.still_authorized():
                    raise SessionClosed(CLOSE_POLICY, "the token expired or was revoked")
            if not self.pending and not self.pong:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), self.hub.config.heartbeat_s)
                except TimeoutError:
                    checked = time.monotonic()
                    if not await self.still_authorized():
                        raise SessionClosed(CLOSE_POLICY, "the token expired or was revoked") from None
                    await self.send({"type": "heartbeat", "historyId": str(self.last)})
                    continue
            if self.pong:
                self.pong = False
                await self.send({"type": "pong"})
            while self.pending:
                change = self.pending.popleft()
                if change.modseq <= self.last:
                    continue  # replayed already
                if change.modseq > self.last + 1:
                    # ids were skipped (events lost while NATS reconnected, or out of order):
                    # the changelog has them all, this one included
                    await self.catch_up(self.last)
                    if change.modseq <= self.last:
                        continue
                await self.send_change(change)

    async def read(self) -> None:
        """Reads client frames until it goes away; answers {"type": "ping"}."""
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text and len(text) <= 1024:
                try:
                    frame = json.loads(text)
                except ValueError:
                    continue
                if isinstance(frame, dict) and frame.get("type") == "ping":
                    self.pong = True
                    self.wake.set()

    async def run(self, since: int | None) -> SessionClosed | None:
        """Runs until the client leaves (None) or the session must close (the reason)."""
        reader = asyncio.create_task(self.read())
        pumper = asyncio.create_task(self.pump(since))
        stopper = asyncio.create_task(self.stopped.wait())
        try:
            done, _ = await asyncio.wait({reader, pumper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (reader, pumper, stopper):
                t.cancel()
            await asyncio.gather(reader, pumper, stopper, return_exceptions=True)
        if self.ended is not None:
            return self.ended
        if pumper in done:
            exc = pumper.exception() if not pumper.cancelled() else None
            if isinstance(exc, SessionClosed):
                return exc
            if isinstance(exc, WebSocketDisconnect | OSError):
                return None
            if exc is not None:
                log.error("push: session failed: %s: %s", exc.__class__.__name__, exc)
                return SessionClosed(CLOSE_INTERNAL, "internal error; reconnect with since")
        return None  # the client closed


async def _close(ws: WebSocket, closed: SessionClosed, timeout_s: float) -> None:
    if ws.application_state == WebSocketState.DISCONNECTED or ws.client_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(closed.code, closed.reason), timeout_s)


async def _events(ws: WebSocket) -> None:
    hub = hub_of(ws.app)
    token, offered = _offered_token(ws)
    try:
        user = await websocket_user(hub.gw, token) if token else None
    except Exception as exc:  # the token store is unavailable: a temporary failure, not a 401
        log.warning("push: token lookup failed: %s: %s", exc.__class__.__name__, exc)
        await ws.accept(subprotocol=SUBPROTOCOL if offered else None)
        await _close(ws, SessionClosed(CLOSE_TRY_LATER, "authentication is unavailable; retry later"),
                     hub.config.close_timeout_s)
        return
    await ws.accept(subprotocol=SUBPROTOCOL if offered else None)
    if user is None or token is None:
        why = "invalid or expired token" if token else "missing token: offer the subprotocols 'bearer, <token>'"
        await _close(ws, SessionClosed(CLOSE_POLICY, f"unauthorized: {why}"), hub.config.close_timeout_s)
        return
    tracer = telemetry.tracer()
    with tracer.start_as_current_span("push.session", kind=SpanKind.SERVER,
                                      attributes={"mailmesh.user_id": user.user_id}) as span:
        session = Session(hub, ws, user, token)
        closed: SessionClosed | None = None
        try:
            try:
                hub.gw.limits.request(user.user_id)
            except ApiError as err:
                raise SessionClosed(CLOSE_TOO_MANY, err.message) from None
            since = _since_param(ws)
            if since is not None:
                span.set_attribute("mailmesh.history.since", since)
            await hub.attach(session)
            closed = await session.run(since)
        except SessionClosed as exc:
            closed = exc
        finally:
            await hub.detach(session)
            span.set_attribute("mailmesh.push.events_sent", session.sent)
            span.set_attribute("mailmesh.history_id", session.last)
        if closed is not None:
            span.set_attribute("mailmesh.push.close_code", closed.code)
            if closed.code in (CLOSE_INTERNAL, CLOSE_TRY_LATER):
                span.set_status(Status(StatusCode.ERROR, closed.reason))
            await _close(ws, closed, hub.config.close_timeout_s)


router = APIRouter(lifespan=lifespan)
router.add_api_route("/v1/history", _history, methods=["GET"], response_model=history.HistoryList,
                     response_model_exclude_none=True, responses=router_responses, tags=["history"],
                     summary="Changes after a history id", operation_id="listHistory")
router.add_api_websocket_route("/v1/events", _events, name="events")
