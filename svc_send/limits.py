"""Sending limits: recipients per message, message size, messages per user per UTC day. Each
failure names the limit and the value, for the API (gRPC status) and SMTP submission alike."""

from __future__ import annotations

from mailmesh_common.config import Settings
from mailmesh_common.errors import InvalidInput, LimitExceeded, SmtpFace
from svc_send.schedule import HeldSends


class TooManyRecipients(InvalidInput):
    smtp = SmtpFace(452, "4.5.3", "Too many recipients")


class MessageTooBig(LimitExceeded):
    # RFC 3463: 5.3.4 message too big for system
    smtp = SmtpFace(552, "5.3.4", "Message too big for system")


class DailyLimitExceeded(LimitExceeded):
    # the reply large providers give for a sending quota (RFC 3463 5.4.5: system congestion)
    smtp = SmtpFace(550, "5.4.5", "Daily sending quota exceeded")


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def check_recipients(count: int, settings: Settings) -> None:
    if count == 0:
        raise InvalidInput("the message has no recipients: give at least one of to, cc or bcc")
    limit = settings.max_recipients_per_message
    if count > limit:
        raise TooManyRecipients(f"the message has {count} recipients; at most {limit} are allowed per message")


def check_size(size: int, settings: Settings) -> None:
    limit = settings.max_message_bytes
    if size > limit:
        raise MessageTooBig(f"the message is {_mb(size)} ({size} bytes); the limit is {_mb(limit)} ({limit} bytes)")


async def check_daily(held: HeldSends, user: str, now_us: int, settings: Settings) -> None:
    limit = settings.sends_per_day
    sent = await held.sent_today(user, now_us)
    if sent >= limit:
        raise DailyLimitExceeded(f"daily sending limit reached: {sent} of {limit} messages sent today (UTC); "
                                 "try again tomorrow")


__all__ = ["DailyLimitExceeded", "MessageTooBig", "TooManyRecipients", "check_daily", "check_recipients",
           "check_size"]
