"""Learning from users: the EVENTS consumer that trains the spam model when a user marks a
message as spam or as not spam.

A MailboxEvent whose change is LABELS_CHANGED with "SPAM" among the added labels trains that
message as spam; "SPAM" among the removed labels trains it as ham, unless the message went to
TRASH (deleting spam is not calling it good mail) or kept no label at all. Both train the
global model and that user's adjustments. Mail the ingest itself delivered into SPAM arrives
as MESSAGE_ADDED and is not learnt from (the filter must not reinforce its own verdicts), nor
are deletions.

The raw message comes from the mailbox service (GetMessage, format RAW) as a system call
carrying the mesh token. The block svc_ingest prepended at delivery (Return-Path, our own
Received "by ... (mailmesh)", Authentication-Results, X-Spam-*) is taken off first, so the
model learns the message as the filter saw it when it arrived. Training is idempotent per message, so a redelivered event changes
nothing; a message that no longer exists is skipped; an unavailable mailbox or KV store naks
the event for redelivery (the consumer naks on Unavailable).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

import grpc
from mailmesh.v1 import events_pb2, types_pb2
from mailmesh.v1 import mailbox_service_pb2 as pb
from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from mailmesh_common import streams
from mailmesh_common.errors import InvalidInput, NotFound
from mailmesh_common.grpcclient import translate
from svc_ingest.spam.filter import SpamFilter

__all__ = ["DURABLE", "SpamFeedback", "feedback_label", "strip_ingest_headers"]

log = logging.getLogger(__name__)

DURABLE = "svc-ingest-spam-feedback"
SPAM = "SPAM"
TRASH = "TRASH"
FETCH_TIMEOUT_S = 30.0
RETRY_MIN_S = 0.5  # backoff when the EVENTS consumer cannot run (NATS down)
RETRY_MAX_S = 15.0


_FIELD_START = re.compile(rb"^([!-9;-~]+):", re.M)


def strip_ingest_headers(raw: bytes) -> bytes:
    """raw without the header block svc_ingest prepends (see svc_ingest.pipeline): the leading
    run of Return-Path, Received "(mailmesh)", Authentication-Results and X-Spam-* fields, when
    it holds our Received; otherwise raw unchanged."""
    pos = 0
    ours = False
    limit = min(len(raw), 64 * 1024)
    while pos < limit:
        m = _FIELD_START.match(raw, pos)
        if m is None:
            break
        name = m.group(1).lower()
        end = pos
        while True:  # the field ends at a line that does not start with white space
            nl = raw.find(b"\n", end)
            if nl < 0:
                return raw
            end = nl + 1
            if raw[end:end + 1] not in (b" ", b"\t"):
                break
        value = raw[m.end():end]
        if name == b"received":
            if ours or b"(mailmesh)" not in value:
                break
            ours = True
        elif name not in (b"return-path", b"authentication-results") and not name.startswith(b"x-spam-"):
            break
        pos = end
    return raw[pos:] if ours else raw


def feedback_label(change: types_pb2.Change) -> bool | None:
    """True when the change says "this is spam", False for "this is not spam", else None."""
    if change.type != types_pb2.CHANGE_TYPE_LABELS_CHANGED or not change.message_id:
        return None
    if SPAM in change.added_label_ids:
        return True
    if SPAM in change.removed_label_ids:
        labels = set(change.label_ids)
        if TRASH in labels or not labels:
            return None
        return False
    return None


class SpamFeedback:
    """Consumes EVENTS (durable consumer DURABLE) and trains `filter` on users' judgements."""

    def __init__(self, filter: SpamFilter, js: JetStreamContext,
                 mailbox_stub_factory: Callable[[], pb_grpc.MailboxServiceStub]) -> None:
        self.filter = filter
        self.js = js
        self._stub_factory = mailbox_stub_factory
        self._stub: pb_grpc.MailboxServiceStub | None = None
        self.trained = 0  # messages trained (for tests and metrics)

    @property
    def stub(self) -> pb_grpc.MailboxServiceStub:
        if self._stub is None:
            self._stub = self._stub_factory()
        return self._stub

    async def run(self, stop: asyncio.Event) -> None:
        """Consume EVENTS until stop is set; when NATS fails (e.g. it is down while the consumer
        is created), log and retry with backoff rather than end: feedback must not stop silently."""
        delay = RETRY_MIN_S
        while not stop.is_set():
            try:
                await streams.consume(self.js, streams.EVENTS, events_pb2.MailboxEvent, self.handle,
                                      streams.ConsumerOptions(durable=DURABLE), stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("spam feedback: EVENTS consumer failed (%s: %s); retrying in %.1fs",
                            type(exc).__name__, exc, delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, RETRY_MAX_S)

    async def handle(self, event: events_pb2.MailboxEvent, _msg: Msg | None = None) -> None:
        """One event: train when it is a user's spam judgement; otherwise nothing."""
        change = event.change
        is_spam = feedback_label(change)
        if is_spam is None or not change.user_id:
            return
        raw = await self._fetch_raw(change.user_id, change.message_id)
        if raw is None:
            return
        raw = strip_ingest_headers(raw)
        spam_msgs, ham_msgs = await self.filter.train(raw, is_spam=is_spam, user_id=change.user_id)
        self.trained += 1
        log.info("spam feedback: trained message %s of user %s as %s (model: %d spam, %d ham)",
                 change.message_id, change.user_id, "spam" if is_spam else "ham", spam_msgs, ham_msgs)

    async def _fetch_raw(self, user_id: str, message_id: str) -> bytes | None:
        request = pb.GetMessageRequest(name=f"users/{user_id}/messages/{message_id}",
                                       format=types_pb2.MESSAGE_FORMAT_RAW)
        try:
            response = await self.stub.GetMessage(request, timeout=FETCH_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            err = translate(exc)  # UNAVAILABLE and DEADLINE_EXCEEDED become Unavailable: retried
            if isinstance(err, (NotFound, InvalidInput)):
                log.info("spam feedback: message %s of user %s cannot be read (%s); skipped",
                         message_id, user_id, err.message)
                return None
            raise err from exc
        return bytes(response.message.raw)
