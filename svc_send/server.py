"""Wires svc_send: its store (send.db, or FoundationDB), the mailbox client, DKIM keys (in the
store; key files under {data_dir}/dkim imported at start), SendService over gRPC,
the scheduler of held sends, the OUTBOUND delivery workers and the SMTP submission listener."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from mailmesh.v1 import send_service_pb2_grpc as spb_grpc

from mailmesh_common.blobstore import open_blobstore
from mailmesh_common.config import Settings
from mailmesh_common.dns import Resolver
from mailmesh_common.grpcserver import PortInUse
from mailmesh_common.kv import Database
from mailmesh_common.mailboxclient import MailboxClient
from mailmesh_common.service import ServiceContext, main
from svc_send import tls
from svc_send.delivery import Delivery
from svc_send.dkim_keys import DkimKeyFiles, DkimKeyStore, dkim_root
from svc_send.dkim_sign import Signer
from svc_send.outbound import Outbox
from svc_send.queue import QueueStore, parse_schedule
from svc_send.schedule import HeldSends
from svc_send.servicer import SendServicer, service_name
from svc_send.store import open_send_db
from svc_send.submission import SubmissionServer

log = logging.getLogger(__name__)


@dataclass
class Send:
    """The running parts of one svc_send (tests reach in through ctx.components["send"])."""

    settings: Settings
    db: Database
    outbox: Outbox
    held: HeldSends
    queue: QueueStore
    delivery: Delivery
    submission: SubmissionServer
    mailbox: MailboxClient
    keys: DkimKeyStore


def hostname_of(settings: Settings) -> str:
    return settings.smtp_hostname or socket.gethostname() or "localhost"


async def start_send(ctx: ServiceContext) -> Send:
    s = ctx.settings
    assert ctx.js is not None
    schedule = parse_schedule(s.outbound_retry_schedule_s)
    hostname = hostname_of(s)
    db = open_send_db(s)
    ctx.closers.append(db.close)
    mailbox = MailboxClient.connect(s, system=True)  # svc_send checks the acting user itself
    ctx.closers.append(mailbox.close)
    blobs = open_blobstore(s)  # files, or the S3 bucket every replica reads (blob_url)
    await blobs.check()
    queue = QueueStore(db, schedule, s.outbound_max_age_s, secret=s.token())
    held = HeldSends(db, s.outbound_max_age_s, secret=s.token())
    keys = DkimKeyStore(db)
    imported = await keys.import_files(DkimKeyFiles(dkim_root(s.data_dir)))
    for k in imported:
        log.info("DKIM key %s of %s imported from %s into the send store", k.selector, k.domain,
                 dkim_root(s.data_dir))
    outbox = Outbox(s, ctx.js, mailbox, blobs, held, queue, Signer(keys), hostname)
    delivery = Delivery(s, ctx.js, queue, mailbox, blobs, Resolver.from_settings(s), hostname)
    spb_grpc.add_SendServiceServicer_to_server(SendServicer(outbox, held, queue, delivery), ctx.server.server)
    ctx.spawn(outbox.run_scheduler(ctx.stop), "send-scheduler")
    ctx.spawn(delivery.run(ctx.stop), "outbound-delivery")
    submission = SubmissionServer(s, outbox, mailbox, tls.submission_context(s, hostname), hostname)
    try:
        await submission.start()
    except OSError as exc:
        ports = f"{s.submission_port}" + (f" or {s.submissions_port}" if s.submissions_port else "")
        raise PortInUse(f"svc_send: cannot listen for submission on {s.host}:{ports}: "
                        f"{exc.strerror or 'port in use or not available'}") from exc
    ctx.closers.append(submission.close)  # closers run in reverse: submission stops first
    send = Send(s, db, outbox, held, queue, delivery, submission, mailbox, keys)
    ctx.components["send"] = send
    return send


async def register(ctx: ServiceContext) -> None:
    await start_send(ctx)


def run() -> None:
    main("svc_send", "send_port", register, service_names=(service_name(),))
