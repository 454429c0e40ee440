"""Wires svc_ingest: the SMTP MX listener, IngestService over gRPC, the inbound pipeline (DNS
resolver, clamd, spam filter on its own KV database, blob store, INBOUND handoff), and the spam
feedback consumer (EVENTS: users marking mail as spam or not)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
from dataclasses import dataclass

import grpc
from mailmesh.v1 import ingest_service_pb2_grpc as pb_grpc
from mailmesh.v1 import mailbox_service_pb2_grpc as mb_grpc

from mailmesh_common import grpcclient, tls
from mailmesh_common.blobstore import open_blobstore
from mailmesh_common.config import Settings
from mailmesh_common.dns import Resolver
from mailmesh_common.errors import ConfigError
from mailmesh_common.grpcserver import PortInUse
from mailmesh_common.kv import Database, open_service_database
from mailmesh_common.service import ServiceContext, main
from svc_ingest.checks.virus import ClamdScanner, parse_address
from svc_ingest.handoff import Handoff
from svc_ingest.limits import Limits
from svc_ingest.pipeline import Pipeline, Recipients
from svc_ingest.servicer import IngestServicer, service_name
from svc_ingest.smtp_handler import SmtpListener
from svc_ingest.spam.feedback import SpamFeedback
from svc_ingest.spam.filter import SpamFilter

log = logging.getLogger(__name__)

IO_THREADS = 32


@dataclass
class Ingest:
    """The running parts of one svc_ingest (tests reach in through it)."""

    settings: Settings
    pipeline: Pipeline
    recipients: Recipients
    listener: SmtpListener
    servicer: IngestServicer
    spam_filter: SpamFilter
    db: Database
    mailbox_channel: grpc.aio.Channel

    @property
    def smtp_port(self) -> int:
        return self.listener.port


def hostname_of(settings: Settings) -> str:
    return settings.smtp_hostname or socket.gethostname() or "localhost"


def open_spam_db(settings: Settings) -> Database:
    return open_service_database(settings, "ingest.db", "the spam filter store")


def scanner_of(settings: Settings) -> ClamdScanner | None:
    if not settings.clamd_address:
        return None
    try:
        parse_address(settings.clamd_address)
    except ValueError as exc:
        raise ConfigError(f"clamd_address: {exc}") from None
    return ClamdScanner(settings.clamd_address, settings.clamd_timeout_s)


async def start_ingest(ctx: ServiceContext) -> Ingest:
    s = ctx.settings
    # blob fsyncs, SPF and spam tokenizing run in worker threads; fsync-bound workers must not
    # starve the others (the default pool is cores + 4)
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="ingest-io"))
    assert ctx.nc is not None and ctx.js is not None
    hostname = hostname_of(s)
    db = open_spam_db(s)
    ctx.closers.append(db.close)
    spam_filter = SpamFilter(db, threshold=s.spam_threshold)
    channel = grpcclient.channel(s.addr("mailbox"), s)
    ctx.closers.append(channel.close)
    mailbox = mb_grpc.MailboxServiceStub(channel)
    recipients = Recipients(mailbox)
    blobs = open_blobstore(s)
    await blobs.check()
    handoff = Handoff(blobs, ctx.nc, ctx.js)
    pipeline = Pipeline(s, Resolver(s.dns_servers), handoff, spam_filter=spam_filter, scanner=scanner_of(s),
                        hostname=hostname)
    servicer = IngestServicer(pipeline, recipients, spam_filter, s.max_recipients)
    pb_grpc.add_IngestServiceServicer_to_server(servicer, ctx.server.server)

    ctx.spawn(SpamFeedback(spam_filter, ctx.js, lambda: mailbox).run(ctx.stop), "spam-feedback")

    tls_context = tls.server_context(s, hostname)
    listener = SmtpListener(s, pipeline, recipients, Limits(s.per_ip_max_connections, s.per_ip_messages_per_minute),
                            tls_context, hostname, spool_dir=s.data_dir / "ingest-spool")
    try:
        await listener.start()
    except OSError as exc:
        raise PortInUse(f"svc_ingest: cannot listen for SMTP on {s.host}:{s.smtp_port}: "
                        f"{exc.strerror or 'port in use or not available'}") from exc
    ctx.closers.append(listener.close)  # closers run in reverse: SMTP stops first, while NATS is up
    return Ingest(s, pipeline, recipients, listener, servicer, spam_filter, db, channel)


async def register(ctx: ServiceContext) -> None:
    await start_ingest(ctx)


def lower_priority(settings: Settings) -> None:
    """Gives up `ingest_nice` of CPU priority. On Linux nice is per thread, and threads inherit
    their creator's: this runs before the process starts any (gRPC, telemetry, executors)."""
    if settings.ingest_nice > 0:
        try:
            os.nice(settings.ingest_nice)
        except OSError as exc:  # e.g. a seccomp profile forbidding it: run at normal priority
            log.warning("cannot lower svc_ingest's CPU priority: %s", exc.strerror)


def run() -> None:
    main("svc_ingest", "ingest_port", register, service_names=(service_name(),), prepare=lower_priority)
