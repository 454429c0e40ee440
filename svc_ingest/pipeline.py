"""The inbound pipeline, the one path by which mail enters the mesh (SMTP DATA and
IngestService.InjectMessage alike).

In order (DESIGN "How mail flows"): size and loop limits, SPF, DKIM, DMARC (reject: 550 5.7.1;
quarantine: deliver to SPAM), virus scan, spam score (accept-then-filter: never refused for
spam), then `Received`, `Authentication-Results` and `X-Spam-*` headers are prepended, and the
message is handed off durably (blob, then INBOUND, acked). A refusal is a `Refused` error
carrying its SMTP reply; a dependency down is `Unavailable` (451 4.3.0); nothing is ever
acknowledged that is not durable.

Recipients are checked before the message is read (RCPT TO for SMTP): `Recipients` asks
svc_mailbox, as a system call, whether an address is a local user.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import default as default_policy

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from mailmesh.v1 import events_pb2
from mailmesh.v1 import mailbox_service_pb2 as mb_pb
from mailmesh.v1 import mailbox_service_pb2_grpc as mb_grpc
from opentelemetry import trace

from mailmesh_common import auth
from mailmesh_common.config import Settings
from mailmesh_common.dns import Resolver
from mailmesh_common.errors import MailmeshError, Unavailable
from mailmesh_common.mime import MailAddress, ParsedMessage
from svc_ingest import replies
from svc_ingest.checks import authres, dkim, dmarc, dnsbl, rdns, spf
from svc_ingest.checks.dkim import DkimResult
from svc_ingest.checks.dmarc import DmarcResult
from svc_ingest.checks.spf import SpfResult
from svc_ingest.checks.virus import ClamdScanner, ScannerUnavailable
from svc_ingest.handoff import Handoff
from svc_ingest.replies import Reply
from svc_ingest.spam.filter import AuthSummary, SpamFilter
from svc_ingest.spam.tokenizer import analyze

log = logging.getLogger(__name__)

RECIPIENT_CHECK_TIMEOUT_S = 10.0
RECIPIENT_CACHE_TTL_S = 5.0
RECIPIENT_CACHE_ENTRIES = 10_000
MAX_HELO_CHARS = 255
# messages up to this size are parsed and tokenized for the spam filter on the event loop;
# larger ones in a worker thread, so the loop never stalls long
INLINE_ANALYZE_BYTES = 32 * 1024


# --- errors --------------------------------------------------------------------------------------

_GRPC_FOR_REPLY: dict[tuple[int, str], grpc.StatusCode] = {
    (552, "5.3.4"): grpc.StatusCode.RESOURCE_EXHAUSTED,
    (452, "4.5.3"): grpc.StatusCode.RESOURCE_EXHAUSTED,
    (554, "5.4.6"): grpc.StatusCode.FAILED_PRECONDITION,
    (550, "5.1.1"): grpc.StatusCode.NOT_FOUND,
}


class Refused(MailmeshError):
    """The pipeline refuses a message; `smtp` is the reply. Its gRPC face follows the reply: a
    precise code where one fits (size and count limits, loops, unknown users), else 4xx
    UNAVAILABLE (try again) and 5xx PERMISSION_DENIED."""

    def __init__(self, reply: Reply, message: str = "") -> None:
        super().__init__(message or reply.text)
        self.smtp = reply
        default = grpc.StatusCode.UNAVAILABLE if reply.code < 500 else grpc.StatusCode.PERMISSION_DENIED
        self.grpc_code = _GRPC_FOR_REPLY.get((reply.code, reply.enhanced), default)


# --- recipients ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecipientCheck:
    """What RCPT TO should answer for one address."""

    reply: Reply
    user_id: str = ""
    canonical: str = ""

    @property
    def accepted(self) -> bool:
        return self.reply.code == 250


class Recipients:
    """Recipient checks against svc_mailbox's ResolveRecipient (a system call: no acting user).

    A local user found is remembered for `cache_ttl_s` (with the largest message size it was
    found able to take), so a burst of mail to the same people asks the mailbox once; unknown
    users, foreign domains, full mailboxes and failures are never remembered. The price: an
    account deleted in the last few seconds may still get a 250 (its message is then dropped
    at delivery with an error logged, as for an account deleted after RCPT)."""

    def __init__(self, stub: mb_grpc.MailboxServiceStub, timeout_s: float = RECIPIENT_CHECK_TIMEOUT_S, *,
                 cache_ttl_s: float = RECIPIENT_CACHE_TTL_S, cache_entries: int = RECIPIENT_CACHE_ENTRIES) -> None:
        self.stub = stub
        self.timeout_s = timeout_s
        self.cache_ttl_s = cache_ttl_s
        self.cache_entries = cache_entries
        # address -> (expires at (monotonic), largest size accepted, the check)
        self._cache: OrderedDict[str, tuple[float, int, RecipientCheck]] = OrderedDict()

    async def check(self, address: str, size: int = 0) -> RecipientCheck:
        key = address.lower()
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None:
            expires, max_size, cached = hit
            if now < expires and size <= max_size:
                return cached
            if now >= expires:
                del self._cache[key]
        result = await self._ask(address, size)
        if result.reply is replies.RECIPIENT_OK and self.cache_ttl_s > 0 and self.cache_entries > 0:
            prior = self._cache.get(key)
            biggest = max(size, prior[1]) if prior is not None and now < prior[0] else size
            self._cache[key] = (now + self.cache_ttl_s, biggest, result)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        return result

    async def _ask(self, address: str, size: int) -> RecipientCheck:
        tok = auth.set_acting_user(None)
        try:
            resp = await self.stub.ResolveRecipient(
                mb_pb.ResolveRecipientRequest(address=address, message_size=max(size, 0)),
                timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return RecipientCheck(replies.BAD_RECIPIENT_SYNTAX)
            log.warning("recipient check failed: %s %s", exc.code().name, exc.details())
            return RecipientCheck(replies.RECIPIENT_CHECK_UNAVAILABLE)
        finally:
            auth.reset_acting_user(tok)
        r = resp.resolution
        if r == mb_pb.RECIPIENT_RESOLUTION_LOCAL_USER:
            return RecipientCheck(replies.RECIPIENT_OK, resp.user_id, resp.canonical_address)
        if r == mb_pb.RECIPIENT_RESOLUTION_UNKNOWN_USER:
            return RecipientCheck(replies.NO_SUCH_USER, canonical=resp.canonical_address)
        if r == mb_pb.RECIPIENT_RESOLUTION_FOREIGN_DOMAIN:
            return RecipientCheck(replies.RELAY_DENIED, canonical=resp.canonical_address)
        if r == mb_pb.RECIPIENT_RESOLUTION_OVER_QUOTA:
            return RecipientCheck(replies.MAILBOX_FULL, resp.user_id, resp.canonical_address)
        log.error("recipient check: unexpected resolution %d", r)
        return RecipientCheck(replies.RECIPIENT_CHECK_UNAVAILABLE)


# --- the envelope and the outcome ----------------------------------------------------------------

@dataclass
class Envelope:
    """Who sent the message to whom, and how it arrived."""

    mail_from: str
    rcpt_to: list[str]  # accepted local recipients, as given
    user_ids: list[str] = field(default_factory=list)  # their user ids, same order
    client_ip: str = ""
    helo: str = ""
    source: events_pb2.MessageSource.ValueType = events_pb2.MESSAGE_SOURCE_SMTP
    esmtp: bool = True
    smtputf8: bool = False
    tls: str = ""  # "TLSv1.3 TLS_AES_256_GCM_SHA384" when the session used STARTTLS
    ingest_id: str = ""  # preset for idempotent injection; generated otherwise
    # the client's forward-confirmed reverse DNS name ("" none); None: not looked up yet
    client_name: str | None = None

    @property
    def trusted(self) -> bool:
        """An internal source without a client IP: no SPF, DMARC policy or spam scoring."""
        return self.source not in (events_pb2.MESSAGE_SOURCE_SMTP, events_pb2.MESSAGE_SOURCE_UNSPECIFIED) \
            and not self.client_ip


@dataclass
class Accepted:
    ingest_id: str
    authentication_results: str
    spam: events_pb2.SpamVerdict | None
    quarantine: bool
    blob_ref: str
    size: int


@dataclass
class AuthOutcome:
    spf: SpfResult
    dkim: list[DkimResult]
    dmarc: DmarcResult
    header_from: str
    authentication_results: str


def dkim_summary(results: Sequence[DkimResult]) -> str:
    """One DKIM word for the spam rules: pass if any signature passed, else the first result."""
    if any(r.result == "pass" for r in results):
        return "pass"
    if any(r.result == "fail" for r in results):
        return "fail"
    return results[0].result if results else "none"


class _RandomPool:
    """os.urandom bytes drawn a few kilobytes at a time rather than one system call per id;
    emptied in a forked child, which must never reuse its parent's bytes."""

    SIZE = 4000

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._pos + n > len(self._buf):
                self._buf, self._pos = secrets.token_bytes(max(self.SIZE, n)), 0
            out = self._buf[self._pos:self._pos + n]
            self._pos += n
            return out

    def reset(self) -> None:
        self._buf, self._pos, self._lock = b"", 0, threading.Lock()


_RANDOM = _RandomPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_RANDOM.reset)


def new_ingest_id() -> str:
    """Unique and roughly time-ordered: 12 hex digits of milliseconds, 20 of randomness."""
    return f"{int(time.time() * 1000):012x}{_RANDOM.take(10).hex()}"


def ingest_id_for_key(key: str) -> str:
    """The ingest id an idempotency key always maps to."""
    return "k" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:31]


# --- header helpers (bytes in, bytes out; no I/O) ------------------------------------------------

def header_end(raw: bytes) -> int:
    """Offset of the blank line ending the header section (len(raw) when there is none)."""
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    crlf = raw.find(b"\r\n\r\n")
    # a bare-LF blank line only matters before the CRLF one: never scan the body for it
    lf = raw.find(b"\n\n", 0, len(raw) if crlf < 0 else crlf + 1)
    ends = [i for i in (crlf, lf) if i >= 0]
    return min(ends) if ends else len(raw)


def header_fields(head: bytes) -> list[bytes]:
    """The header section split into fields, each with its folded continuation lines."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def field_name(f: bytes) -> bytes:
    name, sep, _ = f.partition(b":")
    return name.strip().lower() if sep else b""


def count_received(raw: bytes) -> int:
    head = raw[:header_end(raw)]
    return sum(1 for f in header_fields(head) if field_name(f) == b"received")


def line_ending(raw: bytes) -> bytes:
    nl = raw.find(b"\n")
    return b"\n" if nl > 0 and raw[nl - 1:nl] != b"\r" else b"\r\n"


# A From of one plain address, bare or with an unquoted display name: by far the most common
# form, read without the (slow) structured header parser.
_PLAIN_FROM = re.compile(
    rb"(?:(?:[A-Za-z0-9_-]+ )*[A-Za-z0-9_-]+ ?)?<[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@(?P<d1>[A-Za-z0-9.-]+)>"
    rb"|[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@(?P<d2>[A-Za-z0-9.-]+)")


def header_from_domain(raw: bytes) -> str:
    """The RFC 5322.From domain DMARC evaluates ("" when there is no single usable one)."""
    head = raw[:header_end(raw)]
    froms = [f for f in header_fields(head) if field_name(f) == b"from"]
    if len(froms) != 1:
        return ""
    plain = _PLAIN_FROM.fullmatch(b" ".join(froms[0].partition(b":")[2].split()))
    if plain is not None:
        return (plain.group("d1") or plain.group("d2")).decode("ascii").rstrip(".").lower()
    try:
        msg = BytesHeaderParser(policy=default_policy).parsebytes(head + b"\r\n\r\n")
        parsed = msg.get_all("From") or []
        if len(parsed) != 1:
            return ""
        addresses = parsed[0].addresses
        if len(addresses) != 1:
            return ""
        return str(addresses[0].domain).strip().rstrip(".").lower()
    except Exception:  # a malformed From is the sender's problem, not a crash
        return ""


_UNSAFE = re.compile(r"[^\x21-\x7e\u0080-\uffff]")


def _clean(text: str, limit: int = MAX_HELO_CHARS) -> str:
    return _UNSAFE.sub("?", text)[:limit]


_DROPPED_FIELDS = frozenset({b"return-path", b"content-length", b"bcc", b"resent-bcc"})


def _remove_fields(raw: bytes, drop: Callable[[bytes], bool]) -> bytes:
    end = header_end(raw)
    fields = header_fields(raw[:end])
    kept = [f for f in fields if not drop(f)]
    if len(kept) == len(fields):
        return raw
    return b"".join(kept) + raw[end:]


def received_header(env: Envelope, ingest_id: str, hostname: str, when: float) -> str:
    """RFC 5321 4.4 time stamp line (value only), with RFC 3848 / RFC 6531 protocol types."""
    if env.client_ip:
        try:
            ip = ipaddress.ip_address(env.client_ip)
            literal = f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"
        except ValueError:
            literal = f"[{_clean(env.client_ip, 64)}]"
        # RFC 5321 4.4 TCP-info: "Domain FWS address-literal" when the PTR name is confirmed
        name = _clean(env.client_name or "", 253)
        origin = f"from {_clean(env.helo) or 'unknown'} ({name + ' ' if name else ''}{literal})"
    else:
        origin = f"from {_clean(env.helo) or 'internal'}"
    if env.source in (events_pb2.MESSAGE_SOURCE_SMTP, events_pb2.MESSAGE_SOURCE_UNSPECIFIED):
        proto = ("UTF8SMTP" if env.smtputf8 else "ESMTP") if env.esmtp else "SMTP"
        if env.tls:
            proto += "S"
    else:
        proto = "HTTP"  # IngestService (gRPC over HTTP/2)
    parts = [origin, f"by {hostname} (mailmesh)"]
    if env.tls:
        parts.append(f"({_clean(env.tls, 120).replace('?', ' ')})")
    parts.append(f"with {proto} id {ingest_id}")
    if len(env.rcpt_to) == 1:  # never list several: that would disclose Bcc recipients
        parts.append(f"for <{_clean(env.rcpt_to[0], 320)}>")
    stamp = email.utils.format_datetime(datetime.datetime.fromtimestamp(when, datetime.UTC))
    return "\r\n\t".join(parts[:-1] + [parts[-1] + "; " + stamp])


def prepend_headers(raw: bytes, headers: Sequence[tuple[str, str]]) -> bytes:
    """raw with headers added on top, in the order given, using raw's line ending."""
    eol = line_ending(raw)
    block = b"".join(f"{name}: {value}".encode("utf-8", "surrogateescape").replace(b"\r\n", eol) + eol
                     for name, value in headers)
    return block + raw


# --- the parsed summary ---------------------------------------------------------------------------

SUMMARY_ADDRESSES = 200  # per field, as the mailbox record keeps them
SUMMARY_IDS = 100
SUMMARY_WARNINGS = 20
_TRUNCATED = ("text body truncated", "HTML body truncated")


def _summary_addresses(out: object, addrs: Sequence[MailAddress]) -> None:
    for a in list(addrs)[:SUMMARY_ADDRESSES]:
        out.add(name=a.name[:500], email=a.email[:320])  # type: ignore[attr-defined]


def parsed_summary(p: ParsedMessage) -> events_pb2.ParsedSummary | None:
    """What the mailbox's record needs of a parsed message, bounded like that record; None
    when the parse cut a body short (its snippet or warnings could then differ from the
    mailbox's own parse, which is left to do it)."""
    if any(w.startswith(_TRUNCATED) for w in p.parse_warnings):
        return None
    s = events_pb2.ParsedSummary(
        subject=p.subject[:2000], message_id=p.message_id[:900], snippet=p.snippet[:200],
        has_attachments=p.has_attachments, in_reply_to=[i[:900] for i in p.in_reply_to[:SUMMARY_IDS]],
        references=[i[:900] for i in p.references[-SUMMARY_IDS:]],
        parse_warnings=[w[:300] for w in p.parse_warnings[:SUMMARY_WARNINGS]])
    for name in ("from", "reply_to", "to", "cc", "bcc"):
        _summary_addresses(getattr(s, name), getattr(p, "from_" if name == "from" else name))
    if p.sender is not None:
        s.sender.name, s.sender.email = p.sender.name[:500], p.sender.email[:320]
    if p.date is not None:
        try:
            s.date.FromDatetime(p.date)
        except (ValueError, OverflowError):
            s.ClearField("date")
    return s


# --- the pipeline --------------------------------------------------------------------------------

class Pipeline:
    """Runs one message from raw bytes to an acked INBOUND handoff."""

    def __init__(self, settings: Settings, resolver: Resolver, handoff: Handoff, *,
                 spam_filter: SpamFilter | None = None,
                 scanner: ClamdScanner | None = None, hostname: str = "localhost") -> None:
        self.settings = settings
        self.resolver = resolver
        self.handoff = handoff
        self.spam_filter = spam_filter
        self.scanner = scanner
        self.hostname = hostname
        self.authserv_id = settings.authserv_id or hostname
        self.max_bytes = settings.max_message_bytes
        self.max_received = settings.max_received_headers
        self.rdns_timeout_s = rdns.RDNS_TIMEOUT_S

    # -- steps --
    async def reverse_name(self, ip: str) -> str:
        """The client's forward-confirmed reverse DNS name, "" when none (bounded; never fails)."""
        return await rdns.verified_name(self.resolver, ip, timeout_s=self.rdns_timeout_s)

    async def blocklisted(self, ip: str) -> str:
        """The configured DNS blocklist that lists the client, "" when none (bounded)."""
        return await dnsbl.listing_zone(self.resolver, ip, self.settings.dnsbl_zones)

    def check_limits(self, raw: bytes) -> None:
        if len(raw) > self.max_bytes:
            raise Refused(replies.MESSAGE_TOO_BIG)
        if count_received(raw) > self.max_received:
            raise Refused(replies.MAIL_LOOP)

    async def authenticate(self, raw: bytes, env: Envelope, ingest_id: str) -> AuthOutcome:
        """SPF (skipped for trusted sources), DKIM and the DMARC policy lookup concurrently, then
        DMARC on their results."""
        from_domain = header_from_domain(raw)
        dkim_task = asyncio.ensure_future(dkim.verify_dkim(self.resolver, raw))
        dmarc_task = dmarc.prefetch(self.resolver, from_domain)
        try:
            if env.trusted:
                mail_from_domain = env.mail_from.rpartition("@")[2].lower()
                spf_result = SpfResult("none", mail_from_domain, "mailfrom", "not checked: internal source")
            else:
                spf_result = await spf.check_spf(self.resolver, env.client_ip, env.mail_from, env.helo,
                                                 receiver=self.hostname)
            dkim_results = await dkim_task
            # sampled on the ingest id: a retried message meets the same pct= fate
            dmarc_result = await dmarc.check_dmarc(self.resolver, from_domain, spf_result, dkim_results,
                                                   sample_key=ingest_id, discovery=dmarc_task)
        finally:
            for task in (dkim_task, dmarc_task):
                if task is None:
                    continue
                if not task.done():
                    task.cancel()
                elif not task.cancelled():
                    task.exception()  # seen: a failure after SPF's is not logged as never retrieved
        ar = authres.authentication_results(self.authserv_id, spf_result, dkim_results, dmarc_result,
                                            header_from=from_domain)
        return AuthOutcome(spf_result, dkim_results, dmarc_result, from_domain, ar)

    async def scan(self, raw: bytes, env: Envelope, ingest_id: str) -> None:
        if self.scanner is None:
            return
        try:
            result = await self.scanner.scan(raw)
        except ScannerUnavailable as exc:
            if self.settings.clamd_required:
                log.error("virus scan unavailable, message deferred: %s", exc.message,
                          extra={"ingest_id": ingest_id, "client_ip": env.client_ip})
                raise Refused(replies.VIRUS_SCAN_UNAVAILABLE) from exc
            log.warning("virus scan unavailable, message passed unscanned (clamd_required=false): %s",
                        exc.message, extra={"ingest_id": ingest_id, "client_ip": env.client_ip})
            trace.get_current_span().set_attribute("mailmesh.virus.unscanned", True)
            return
        if result.infected:
            log.warning("virus found; message refused", extra={
                "event": "virus_refused", "ingest_id": ingest_id, "signature": result.signature,
                "client_ip": env.client_ip, "mail_from": env.mail_from, "rcpt_count": len(env.rcpt_to)})
            trace.get_current_span().set_attribute("mailmesh.virus", result.signature)
            raise Refused(replies.virus_found(result.signature))

    async def classify(self, raw: bytes, env: Envelope, outcome: AuthOutcome) -> tuple[
            events_pb2.SpamVerdict | None, list[tuple[str, str]], ParsedMessage | None]:
        """The spam verdict, its headers, and the filter's parse of the message (reused for the
        ParsedSummary, so the message is parsed once on its way to the mailbox)."""
        if self.spam_filter is None or env.trusted:
            return None, [], None
        summary = AuthSummary(outcome.spf.result, dkim_summary(outcome.dkim), outcome.dmarc.result)
        user_id = env.user_ids[0] if len(set(env.user_ids)) == 1 else ""
        f = self.spam_filter
        try:
            # SpamFilter.classify in its three steps, keeping the analysis it parsed; a small
            # message is analysed right here (about a millisecond: less than the two thread
            # switches a worker thread costs, and the GIL would serialise the work anyway)
            analysis = analyze(raw) if len(raw) <= INLINE_ANALYZE_BYTES else await f.analyze(raw)
            bayes = await f.score(analysis, user_id)
            verdict = f.judge(analysis, bayes, summary)
        except Exception:
            # accept-then-filter: a broken filter must not stop the mail; it lands unscored
            log.exception("spam filter failed; delivering unscored")
            return None, [], None
        headers = [(str(n), str(v)) for n, v in f.headers(verdict)]
        parsed = getattr(analysis, "parsed", None)
        return events_pb2.SpamVerdict(score=float(verdict.score), is_spam=bool(verdict.is_spam),
                                      status=str(verdict.status)), headers, \
            parsed if isinstance(parsed, ParsedMessage) else None

    def _strip_untrusted(self, raw: bytes) -> bytes:
        """RFC 8601 5: drop Authentication-Results claiming to be ours; spam headers from outside;
        and the fields Postfix drops by default (message_drop_headers): Return-Path (ours is the
        one that counts, RFC 5321 4.4), Content-Length (mbox readers trust it), Bcc and
        Resent-Bcc (recipients a careless sender's client would disclose)."""
        ours = self.authserv_id.lower().encode()

        def forged(f: bytes) -> bool:
            name = field_name(f)
            if name.startswith(b"x-spam-") or name in _DROPPED_FIELDS:
                return True
            if name == b"authentication-results":
                value = f.partition(b":")[2].strip().lower()
                return value.split(b";", 1)[0].split()[:1] == [ours]
            return False

        return _remove_fields(raw, forged)

    # -- the whole --
    async def process(self, raw: bytes, env: Envelope) -> Accepted:
        """Checks, filters and hands off raw; Refused, Unavailable, or the accepted message."""
        span = trace.get_current_span()
        ingest_id = env.ingest_id or new_ingest_id()
        span.set_attribute("mailmesh.ingest_id", ingest_id)
        span.set_attribute("mailmesh.size", len(raw))
        span.set_attribute("mailmesh.rcpt_count", len(env.rcpt_to))
        if not env.rcpt_to:
            raise Refused(replies.NO_VALID_RECIPIENTS)
        self.check_limits(raw)
        rdns: asyncio.Future[str] | None = None
        if env.client_name is None and env.client_ip:
            rdns = asyncio.ensure_future(self.reverse_name(env.client_ip))
        try:
            outcome = await self.authenticate(raw, env, ingest_id)
            if rdns is not None:
                env.client_name = await rdns
        finally:
            if rdns is not None and not rdns.done():
                rdns.cancel()
        quarantine = False
        if not env.trusted:
            d = outcome.dmarc
            if d.disposition == "reject":
                log.info("DMARC policy reject", extra={"ingest_id": ingest_id, "domain": d.domain})
                raise Refused(replies.dmarc_reject(d.domain))
            if d.result == "temperror" and d.policy == "reject":
                # the check may pass on a retry: defer rather than reject or accept (RFC 7489 6.6.2)
                raise Refused(replies.DMARC_TEMP_FAILURE)
            quarantine = d.disposition == "quarantine"
        await self.scan(raw, env, ingest_id)
        verdict, spam_headers, parsed = await self.classify(raw, env, outcome)
        if verdict is not None:
            span.set_attribute("mailmesh.spam_score", verdict.score)
        when = time.time()
        body = raw if env.trusted else self._strip_untrusted(raw)
        headers = [("Return-Path", f"<{_clean(env.mail_from, 320)}>"),
                   ("Received", received_header(env, ingest_id, self.hostname, when)),
                   ("Authentication-Results", outcome.authentication_results), *spam_headers]
        final = prepend_headers(body, headers)
        received = Timestamp()
        received.FromNanoseconds(int(when * 1e9))
        msg = events_pb2.InboundMessage(
            ingest_id=ingest_id, mail_from=env.mail_from, rcpt_to=env.rcpt_to, received_time=received,
            source=env.source or events_pb2.MESSAGE_SOURCE_SMTP,
            authentication_results=outcome.authentication_results, remote_ip=env.client_ip,
            helo=env.helo[:MAX_HELO_CHARS], quarantine=quarantine)
        if verdict is not None:
            msg.spam.CopyFrom(verdict)
        if parsed is not None and (summary := parsed_summary(parsed)) is not None:
            msg.parsed.CopyFrom(summary)
        try:
            ref = await self.handoff.hand_off(final, msg)
        except Unavailable:
            raise
        except MailmeshError as exc:  # e.g. a bad blob ref: still never a 250
            raise Unavailable(f"handoff failed: {exc.message}") from exc
        log.info("accepted", extra={"ingest_id": ingest_id, "size": len(final), "rcpt_count": len(env.rcpt_to),
                                    "spam_score": verdict.score if verdict else None, "quarantine": quarantine})
        return Accepted(ingest_id, outcome.authentication_results, verdict, quarantine, ref, len(final))
