"""Delivery Status Notifications (RFC 3464) for recipients that failed: a multipart/report
(RFC 6522) with a human-readable explanation, the machine-readable message/delivery-status
(one block per recipient: Final-Recipient, Action: failed, Status, Remote-MTA, Diagnostic-Code,
Last-Attempt-Date) and the original message's header (text/rfc822-headers).

The DSN is put in the sender's INBOX (they are a local user: only local users send through
svc_send), threaded with the message it is about through In-Reply-To. No DSN is ever made for
the null reverse-path (RFC 3464 2, RFC 5321 4.5.5): the caller checks `mail_from`.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime

from mailmesh.v1 import send_service_pb2 as spb
from mailmesh.v1 import types_pb2

from mailmesh_common.mime.compose import header_values, split_head

MAX_ORIGINAL_HEADER = 64 * 1024
_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_SMTP_REPLY = re.compile(r"^[2-5]\d\d[ -]")


def status_code(reply: str) -> str:
    """The RFC 3463 status of a failure: the enhanced code in the reply, else one from its class."""
    m = _ENHANCED.search(reply)
    if m:
        return m.group(0)  # a 4.x.x (expired while failing temporarily) stays one, as RFC 3464 allows
    if reply[:1] == "4":
        return "4.0.0"
    return "5.0.0"


def _date(t: object) -> str:
    seconds = getattr(t, "seconds", 0)
    return format_datetime(datetime.fromtimestamp(seconds or datetime.now(UTC).timestamp(), UTC))


def _explain(r: types_pb2.RecipientStatus, remote: str) -> str:
    attempts = f"after {r.attempts} attempt{'s' if r.attempts != 1 else ''}" if r.attempts else "without an attempt"
    where = f" The server {remote} answered:" if remote and _SMTP_REPLY.match(r.last_reply) else ""
    return f"  {r.email}\n    {attempts}.{where}\n    {r.last_reply}\n"


def build_dsn(entry: spb.QueueEntry, failed: list[types_pb2.RecipientStatus], original: bytes, *,
              reporting_mta: str, now: datetime | None = None) -> bytes:
    """The DSN for the failed recipients of a delivery (CRLF line ends)."""
    now = now or datetime.now(UTC)
    boundary = f"=_mailmesh_dsn_{uuid.uuid4().hex}"
    head, _, _ = split_head(original)
    original_head = head[:MAX_ORIGINAL_HEADER].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    ids = header_values(original, "Message-ID") if original else []
    orig_id = ids[0].strip() if ids else ""
    subjects = header_values(original, "Subject") if original else []
    subject = (subjects[0] if subjects else entry.subject)[:200]

    human = ["This is the mail system at " + reporting_mta + ".", "",
             "Your message could not be delivered to "
             + ("this recipient" if len(failed) == 1 else f"these {len(failed)} recipients") + ":", ""]
    human += [_explain(r, entry.remote_mta) for r in failed]
    if subject:
        human += ["", f"Subject of your message: {subject}"]
    text = "\r\n".join(line for block in human for line in block.split("\n")) + "\r\n"

    fields = [f"Reporting-MTA: dns; {reporting_mta}", f"X-Mailmesh-Queue-ID: {entry.id}",
              f"Arrival-Date: {_date(entry.create_time)}", ""]
    for r in failed:
        fields += [f"Final-Recipient: rfc822; {r.email}", "Action: failed", f"Status: {status_code(r.last_reply)}"]
        if _SMTP_REPLY.match(r.last_reply):
            if entry.remote_mta:  # absent when the failure was ours (an unknown local mailbox)
                fields.append(f"Remote-MTA: dns; {entry.remote_mta.split(' ')[0]}")
            fields.append(f"Diagnostic-Code: smtp; {' '.join(r.last_reply.split())}")
        else:
            fields.append(f"X-Mailmesh-Diagnostic: {' '.join(r.last_reply.split())}")
        fields.append(f"Last-Attempt-Date: {_date(r.updated_time)}")
        fields.append(f"X-Mailmesh-Attempts: {r.attempts}")
        fields.append("")
    status = "\r\n".join(fields)

    headers = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{entry.mail_from}>",
        "Subject: Undelivered Mail Returned to Sender" + (f": {subject}" if subject else ""),
        f"Date: {format_datetime(now)}",
        f"Message-ID: <{uuid.uuid4().hex}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 5
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
    ]
    if orig_id:
        headers += [f"In-Reply-To: {orig_id}", f"References: {orig_id}"]
    body = (
        f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Description: Notification\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n" + text +
        f"\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\nContent-Description: Delivery report\r\n\r\n"
        + status +
        f"\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\nContent-Description: Undelivered message header\r\n\r\n"
    ).encode("utf-8") + original_head + f"\r\n\r\n--{boundary}--\r\n".encode()
    return "\r\n".join(headers).encode("utf-8") + b"\r\n\r\n" + body


__all__ = ["build_dsn", "status_code"]
