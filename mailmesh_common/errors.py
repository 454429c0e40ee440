"""The MailmeshError family and its three faces: gRPC status, HTTP status, SMTP reply.

Domain code raises these; interceptors and protocol handlers translate them. Messages are for
developers and never carry internals (paths, SQL, stack traces).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class SmtpFace:
    """An SMTP reply: code, RFC 3463 enhanced status code and text."""

    code: int
    enhanced: str
    text: str

    def line(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


class MailmeshError(Exception):
    """Base class. Unknown subclasses map to INTERNAL / 500 / 451 4.3.0."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500
    http_code: str = "INTERNAL"
    smtp: SmtpFace = SmtpFace(451, "4.3.0", "Temporary server error, try again later")

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(MailmeshError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400
    http_code = "INVALID_REQUEST"
    smtp = SmtpFace(501, "5.5.4", "Invalid arguments")


class NotFound(MailmeshError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    http_code = "NOT_FOUND"
    smtp = SmtpFace(550, "5.1.1", "No such user")


class PermissionDenied(MailmeshError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    http_code = "FORBIDDEN"
    smtp = SmtpFace(554, "5.7.1", "Relay access denied")


class Unauthenticated(MailmeshError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    http_code = "UNAUTHORIZED"
    smtp = SmtpFace(535, "5.7.8", "Authentication credentials invalid")


class LimitExceeded(MailmeshError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    http_code = "RATE_LIMITED"
    smtp = SmtpFace(452, "4.5.3", "Too many recipients")


class QuotaExceeded(LimitExceeded):
    """A mailbox or message size quota; permanent for this message."""

    smtp = SmtpFace(552, "5.2.2", "Mailbox full")


class Conflict(MailmeshError):
    grpc_code = grpc.StatusCode.ABORTED
    http_status = 409
    http_code = "CONFLICT"


class AlreadyExists(Conflict):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MailmeshError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409
    http_code = "FAILED_PRECONDITION"


class Unavailable(MailmeshError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    http_code = "SERVICE_UNAVAILABLE"
    smtp = SmtpFace(451, "4.3.0", "Service temporarily unavailable, try again later")


class StorageFull(Unavailable):
    """The disk (or quota) under a store is full: nothing was stored; try again later."""

    smtp = SmtpFace(452, "4.3.1", "Insufficient system storage, try again later")


class ConfigError(MailmeshError):
    """A bad configuration key or value; the message names the key."""


def from_grpc(code: grpc.StatusCode, details: str) -> MailmeshError:
    """The MailmeshError a client should raise for a gRPC status received from a peer."""
    for cls in (InvalidInput, NotFound, PermissionDenied, Unauthenticated, LimitExceeded,
                AlreadyExists, Conflict, FailedPrecondition, Unavailable):
        if cls.grpc_code == code:
            return cls(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(details or "deadline exceeded")
    return MailmeshError(details or code.name)
