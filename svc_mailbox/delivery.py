"""The INBOUND consumer: delivers each accepted message to every local recipient's INBOX or
SPAM, idempotently (keyed by the ingest id), and acks only after every delivery committed."""

from __future__ import annotations

import asyncio
import logging

from mailmesh.v1 import events_pb2
from mailmesh.v1 import mailbox_service_pb2 as pb
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from mailmesh_common import streams
from mailmesh_common.errors import InvalidInput, NotFound
from svc_mailbox.mailbox import Mailbox

log = logging.getLogger(__name__)

DURABLE = "svc-mailbox-delivery"


class InboundConsumer:
    def __init__(self, mailbox: Mailbox, js: JetStreamContext) -> None:
        self.mb = mailbox
        self.js = js

    async def handle(self, msg: events_pb2.InboundMessage, raw: Msg) -> None:
        received = (msg.received_time.seconds * 1_000_000 + msg.received_time.nanos // 1000
                    if msg.HasField("received_time") else 0)
        spam = msg.quarantine or (msg.HasField("spam") and msg.spam.is_spam)
        target = pb.DELIVERY_TARGET_SPAM if spam else pb.DELIVERY_TARGET_INBOX
        # the dedup key; a producer that left it empty still gets exactly-once per stream message
        ingest_id = msg.ingest_id or f"jsseq:{raw.metadata.sequence.stream}"
        for rcpt in dict.fromkeys(msg.rcpt_to):
            try:
                res = await self.mb.resolve_recipient(rcpt, 0)
            except InvalidInput as exc:
                # ingest accepted only valid local recipients; a malformed one must not hold up the rest
                log.error("inbound %s: skipping recipient: %s", msg.ingest_id, exc.message)
                continue
            if not res.user_id:
                # accepted at RCPT time but gone since: keep a trace, nothing to deliver into
                log.error("inbound %s: recipient %s no longer exists; not delivered", msg.ingest_id, rcpt)
                continue
            if res.user_id == msg.sender_user_id and msg.source == events_pb2.MESSAGE_SOURCE_SUBMISSION:
                pass  # a user writing to themself gets the INBOX copy too, like Gmail
            try:
                m, dup = await self.mb.deliver(res.user_id, ingest_id, msg.blob_ref, target,
                                               msg.spam.score if msg.HasField("spam") else 0.0, received,
                                               enforce_quota=False)
            except NotFound as exc:
                log.error("inbound %s for %s: %s", msg.ingest_id, rcpt, exc.message)
                continue
            log.info("delivered", extra={"ingest_id": ingest_id, "user_id": res.user_id,
                                         "message_id": m.id, "duplicate": dup})

    async def run(self, stop: asyncio.Event) -> None:
        await streams.consume(self.js, streams.INBOUND, events_pb2.InboundMessage, self.handle,
                              streams.ConsumerOptions(durable=DURABLE, batch=32, fetch_timeout_s=0.5), stop)
