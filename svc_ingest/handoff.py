"""The durable handoff of an accepted message: the raw bytes to the blob store (fsync'd and
renamed), then an InboundMessage to JetStream INBOUND with the ingest id as Nats-Msg-Id, acked.

Only when `hand_off` returns may the client be told 250 (DESIGN "Durability"). Either store
down raises Unavailable (451 4.3.0). A message for several local recipients is one blob and one
InboundMessage listing them all. Handing off the same ingest id twice is harmless: the blob is
content-addressed, JetStream drops the duplicate within its window, and delivery is idempotent
on the ingest id after that.
"""

from __future__ import annotations

import logging

from mailmesh.v1 import events_pb2
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from mailmesh_common import streams
from mailmesh_common.blobstore import BlobStore
from mailmesh_common.errors import Unavailable

log = logging.getLogger(__name__)


class Handoff:
    def __init__(self, blobs: BlobStore, nc: NATS, js: JetStreamContext, *, publish_timeout_s: float = 5.0) -> None:
        self.blobs = blobs
        self.nc = nc
        self.js = js
        self.publish_timeout_s = publish_timeout_s

    async def hand_off(self, raw: bytes, msg: events_pb2.InboundMessage) -> str:
        """Stores raw, fills msg.blob_ref and msg.size, publishes msg; returns the blob ref once
        INBOUND acknowledged it."""
        if not msg.ingest_id:
            raise ValueError("InboundMessage.ingest_id is required")
        if not self.nc.is_connected:
            # fail fast instead of waiting out the publish timeout while NATS is away
            raise Unavailable("NATS is not connected")
        ref = await self.blobs.put(raw)
        msg.blob_ref = ref
        msg.size = len(raw)
        ack = await streams.publish(self.js, streams.inbound_subject(msg.ingest_id), msg,
                                    msg_id=msg.ingest_id, timeout_s=self.publish_timeout_s)
        if ack.duplicate:
            log.info("INBOUND already had this message", extra={"ingest_id": msg.ingest_id})
        return ref
