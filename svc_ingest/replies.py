"""Every SMTP reply svc_ingest gives, as named constants with RFC 3463 enhanced status codes.

Hooks return these; `enhance()` adds an enhanced code to the replies aiosmtpd writes itself, so
that every 2xx/4xx/5xx reply but the greeting and the EHLO/HELO answer carries one (RFC 2034 3).
"""

from __future__ import annotations

import re

from mailmesh_common.errors import MailmeshError, SmtpFace

# One type for the error family's SMTP face and for the replies below.
Reply = SmtpFace

# --- positive ------------------------------------------------------------------------------------
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
RESET_OK = Reply(250, "2.0.0", "Reset OK")
BYE = Reply(221, "2.0.0", "Bye")

# --- MAIL ----------------------------------------------------------------------------------------
# RFC 1870 6: SIZE over the fixed maximum; RFC 3463 5.3.4 message too big for system
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message too big for system")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_SIZE_PARAMETER = Reply(501, "5.5.4", "Invalid SIZE parameter")
# per-IP message rate (RFC 3463 4.7.x: security or policy status)
RATE_LIMITED = Reply(451, "4.7.1", "Too many messages from your address, try again later")

# --- RCPT ----------------------------------------------------------------------------------------
NO_SUCH_USER = Reply(550, "5.1.1", "No such user")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
MAILBOX_FULL = Reply(552, "5.2.2", "Mailbox full")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
# RFC 5321 4.5.3.1.8: at least 100 recipients must be accepted; past the limit, 452
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
RECIPIENT_CHECK_UNAVAILABLE = Reply(451, "4.3.0", "Recipient check temporarily unavailable, try again later")

# --- DATA ----------------------------------------------------------------------------------------
START_DATA = "354 End data with <CR><LF>.<CR><LF>"  # 3xx replies carry no enhanced code
# RFC 3463 5.4.6: routing loop detected
MAIL_LOOP = Reply(554, "5.4.6", "Routing loop detected: too many Received headers")
VIRUS_FOUND = Reply(554, "5.7.1", "Message refused: it contains a virus")
VIRUS_SCAN_UNAVAILABLE = Reply(451, "4.7.0", "Virus scanning temporarily unavailable, try again later")
DMARC_REJECT = Reply(550, "5.7.1", "Message refused by the sender domain's DMARC policy")
DMARC_TEMP_FAILURE = Reply(451, "4.7.0", "Sender authentication temporarily failed, try again later")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
TEMP_FAILURE = Reply(451, "4.3.0", "Temporary server error, try again later")

# --- connection ----------------------------------------------------------------------------------
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections from your address, try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later")
SERVER_BUSY = Reply(421, "4.3.2", "Too many connections, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing the connection")


def blocklisted(ip: str, zone: str) -> Reply:
    """RCPT from a client a DNS blocklist lists (the wording Postfix's reject_rbl_client uses)."""
    return Reply(554, "5.7.1", f"Service unavailable; client [{ip}] blocked using {zone}")


def queued(ingest_id: str) -> Reply:
    """250 after the INBOUND publish ack, naming the ingest id."""
    return Reply(250, "2.0.0", f"OK: queued as {ingest_id}")


def dmarc_reject(domain: str) -> Reply:
    return Reply(550, "5.7.1", f"Message refused by the DMARC policy of {domain}")


def virus_found(name: str) -> Reply:
    return Reply(554, "5.7.1", f"Message refused: it contains a virus ({name})")


def for_error(exc: BaseException) -> Reply:
    """The SMTP face of an error: a MailmeshError's own, else a temporary failure."""
    if isinstance(exc, MailmeshError):
        return exc.smtp
    return TEMP_FAILURE


# --- enhanced codes for aiosmtpd's own replies ---------------------------------------------------

_HAS_ENHANCED = re.compile(r"\A\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |\Z)")
_CODE = re.compile(r"\A(\d{3})([ -]?)(.*)\Z", re.DOTALL)

# RFC 3463 / RFC 5248 defaults by basic code, for replies that come without one
_DEFAULTS = {
    "211": "2.0.0", "214": "2.0.0", "220": "2.0.0", "221": "2.0.0", "250": "2.0.0", "252": "2.0.0",
    "421": "4.3.2", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0", "455": "4.5.4",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4", "530": "5.7.0",
    "535": "5.7.8", "538": "5.7.11", "550": "5.0.0", "551": "5.1.6", "552": "5.3.4", "553": "5.1.3",
    "554": "5.0.0", "555": "5.5.4",
}


def enhance(line: str) -> str:
    """`line` with an enhanced status code after the basic one, when it is a 2xx/4xx/5xx reply
    without one (3xx intermediate replies never carry one)."""
    if _HAS_ENHANCED.match(line):
        return line
    m = _CODE.match(line)
    if m is None:
        return line
    code, sep, text = m.groups()
    if code[0] not in "245":
        return line
    enhanced = _DEFAULTS.get(code, f"{code[0]}.0.0")
    text = text.removeprefix("Error: ").strip()
    return f"{code}{sep or ' '}{enhanced} {text}".rstrip()
