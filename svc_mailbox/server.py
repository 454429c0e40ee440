"""Wires svc_mailbox: the KV store (SQLite or FoundationDB), the blob store, MailboxService over
gRPC, the INBOUND consumer, the EVENTS relay, and resumption of interrupted long operations."""

from __future__ import annotations

import logging

from mailmesh.v1 import mailbox_service_pb2_grpc as pb_grpc

from mailmesh_common.blobstore import open_blobstore
from mailmesh_common.errors import Unavailable
from mailmesh_common.kv import open_database
from mailmesh_common.service import ServiceContext, main
from svc_mailbox.accounts import user_for_address
from svc_mailbox.changelog import ChangeHub, EventsRelay
from svc_mailbox.delivery import InboundConsumer
from svc_mailbox.mailbox import Mailbox
from svc_mailbox.servicer import MailboxServicer, service_name

log = logging.getLogger(__name__)


def open_store(ctx: ServiceContext) -> Mailbox:
    s = ctx.settings
    url = f"fdb:{s.fdb_cluster_file}" if s.fdb_cluster_file else s.resolved_kv_path()
    if not s.fdb_cluster_file:
        s.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        db = open_database(url)
    except OSError as exc:
        raise Unavailable(f"cannot open the mailbox store: {exc.strerror}") from exc
    return Mailbox(db, open_blobstore(s), s, ChangeHub())


async def register(ctx: ServiceContext) -> None:
    mailbox = open_store(ctx)
    ctx.components["mailbox"] = mailbox
    ctx.closers.append(mailbox.db.close)
    await mailbox.blobs.check()
    pb_grpc.add_MailboxServiceServicer_to_server(MailboxServicer(mailbox), ctx.server.server)
    assert ctx.js is not None
    await mailbox.resume_jobs()
    await check_postmaster(mailbox)
    ctx.spawn(InboundConsumer(mailbox, ctx.js).run(ctx.stop), "inbound-consumer")
    ctx.spawn(EventsRelay(mailbox.db, ctx.js, mailbox.hub, ctx.settings.changelog_retention).run(ctx.stop),
              "events-relay")
    ctx.spawn(mailbox.run_blob_gc(ctx.stop, ctx.settings.blob_gc_grace_s), "blob-gc")


async def check_postmaster(mailbox: Mailbox) -> None:
    """Tells the operator, at start, when postmaster@ mail (RFC 5321 4.5.1) has nowhere to go."""
    postmaster = mailbox.settings.postmaster
    if not postmaster:
        log.warning("postmaster is not set (MAILMESH_POSTMASTER): mail to postmaster@ and abuse@ of a "
                    "local domain is refused unless an account or alias has that address")
    elif await mailbox.db.run(lambda tr: user_for_address(tr, postmaster), readonly=True) is None:
        log.warning("postmaster %s is not an account or alias here: postmaster@ and abuse@ mail is "
                    "refused until it is", postmaster)


def run() -> None:
    main("svc_mailbox", "mailbox_port", register, service_names=(service_name(),))
