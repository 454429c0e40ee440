"""IngestService over gRPC: InjectMessage runs a raw message through the same pipeline and
guarantees as SMTP (returns once INBOUND acked it); ClassifyMessage and TrainSpam inspect and
teach the spam filter."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from mailmesh.v1 import events_pb2
from mailmesh.v1 import ingest_service_pb2 as pb
from mailmesh.v1 import ingest_service_pb2_grpc as pb_grpc

from mailmesh_common.errors import FailedPrecondition, InvalidInput
from svc_ingest import replies
from svc_ingest.pipeline import Envelope, Pipeline, Recipients, Refused, ingest_id_for_key
from svc_ingest.spam.filter import SpamFilter

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

MAX_IDEMPOTENCY_KEY = 200


def service_name() -> str:
    return str(pb.DESCRIPTOR.services_by_name["IngestService"].full_name)


class IngestServicer(pb_grpc.IngestServiceServicer):
    def __init__(self, pipeline: Pipeline, recipients: Recipients, spam_filter: SpamFilter | None,
                 max_recipients: int) -> None:
        self.pipeline = pipeline
        self.recipients = recipients
        self.spam_filter = spam_filter
        self.max_recipients = max_recipients

    def _raw(self, raw: bytes) -> bytes:
        if not raw:
            raise InvalidInput("raw must not be empty")
        if len(raw) > self.pipeline.max_bytes:
            raise Refused(replies.MESSAGE_TOO_BIG, f"raw is larger than {self.pipeline.max_bytes} bytes")
        return raw

    def _filter(self) -> SpamFilter:
        if self.spam_filter is None:
            raise FailedPrecondition("the spam filter is not configured")
        return self.spam_filter

    async def InjectMessage(self, request: pb.InjectMessageRequest, context: Ctx) -> pb.InjectMessageResponse:
        raw = self._raw(request.raw)
        if not request.rcpt_to:
            raise InvalidInput("rcpt_to must name at least one recipient")
        if len(request.rcpt_to) > self.max_recipients:
            raise Refused(replies.TOO_MANY_RECIPIENTS, f"at most {self.max_recipients} recipients")
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidInput(f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters")
        outcomes: list[pb.RecipientOutcome] = []
        accepted: list[str] = []
        user_ids: list[str] = []
        seen: set[str] = set()
        for rcpt in request.rcpt_to:
            check = await self.recipients.check(rcpt, len(raw))
            if check.reply.code >= 400 and check.reply.code < 500:
                raise Refused(check.reply, f"recipient {rcpt[:100]!r}: {check.reply.text}")
            outcomes.append(pb.RecipientOutcome(address=rcpt, accepted=check.accepted,
                                                reply="" if check.accepted else check.reply.line()))
            key = check.canonical or rcpt.lower()
            if check.accepted and key not in seen:
                seen.add(key)
                accepted.append(rcpt)
                user_ids.append(check.user_id)
        if not accepted:
            return pb.InjectMessageResponse(recipients=outcomes)
        env = Envelope(
            mail_from=request.mail_from, rcpt_to=accepted, user_ids=user_ids, client_ip=request.client_ip,
            helo=request.helo, source=request.source or events_pb2.MESSAGE_SOURCE_SMTP, esmtp=True,  # proto: unset = SMTP
            ingest_id=ingest_id_for_key(request.idempotency_key) if request.idempotency_key else "")
        result = await self.pipeline.process(raw, env)
        resp = pb.InjectMessageResponse(ingest_id=result.ingest_id, recipients=outcomes,
                                        authentication_results=result.authentication_results)
        if result.spam is not None:
            resp.spam.CopyFrom(result.spam)
        return resp

    async def ClassifyMessage(self, request: pb.ClassifyMessageRequest, context: Ctx) -> pb.ClassifyMessageResponse:
        raw = self._raw(request.raw)
        verdict = await self._filter().classify(raw, user_id=request.user_id)
        return pb.ClassifyMessageResponse(spam=events_pb2.SpamVerdict(
            score=float(verdict.score), is_spam=bool(verdict.is_spam), status=str(verdict.status)))

    async def TrainSpam(self, request: pb.TrainSpamRequest, context: Ctx) -> pb.TrainSpamResponse:
        raw = self._raw(request.raw)
        spam_msgs, ham_msgs = await self._filter().train(raw, is_spam=request.is_spam, user_id=request.user_id)
        return pb.TrainSpamResponse(spam_messages=int(spam_msgs), ham_messages=int(ham_msgs))
