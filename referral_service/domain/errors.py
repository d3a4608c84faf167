"""Domain errors. ``pipeline/errors.py`` maps each one, once, to a ``google.rpc.Status``.

``Reason`` mirrors the proto enum ``referral.v1.ErrorReason`` (without its ``ERROR_REASON_``
prefix); a test keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class Reason(StrEnum):
    VALIDATION_FAILED = "VALIDATION_FAILED"
    REQUEST_ID_CONFLICT = "REQUEST_ID_CONFLICT"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    INVALID_SCOPE = "INVALID_SCOPE"
    EMAIL_ALREADY_REGISTERED = "EMAIL_ALREADY_REGISTERED"
    INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
    ACCOUNT_DISABLED = "ACCOUNT_DISABLED"
    EMAIL_TOKEN_INVALID = "EMAIL_TOKEN_INVALID"
    EMAIL_TOKEN_EXPIRED = "EMAIL_TOKEN_EXPIRED"
    EMAIL_TOKEN_USED = "EMAIL_TOKEN_USED"
    TOKEN_MISSING = "TOKEN_MISSING"
    TOKEN_INVALID = "TOKEN_INVALID"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    TOKEN_REVOKED = "TOKEN_REVOKED"
    REFRESH_TOKEN_REUSED = "REFRESH_TOKEN_REUSED"
    INVALID_CLIENT = "INVALID_CLIENT"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    USER_NOT_FOUND = "USER_NOT_FOUND"
    SCOPE_MISSING = "SCOPE_MISSING"
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    REFERRAL_CODE_ALREADY_ACTIVE = "REFERRAL_CODE_ALREADY_ACTIVE"
    REFERRAL_CODE_TAKEN = "REFERRAL_CODE_TAKEN"
    REFERRAL_CODE_NOT_FOUND = "REFERRAL_CODE_NOT_FOUND"
    REFERRAL_CODE_UNKNOWN = "REFERRAL_CODE_UNKNOWN"
    REFERRAL_CODE_EXPIRED = "REFERRAL_CODE_EXPIRED"
    REFERRAL_CODE_REVOKED = "REFERRAL_CODE_REVOKED"
    REFERRAL_CODE_EXHAUSTED = "REFERRAL_CODE_EXHAUSTED"
    SELF_REFERRAL = "SELF_REFERRAL"
    RATE_LIMITED = "RATE_LIMITED"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    CANCELLED = "CANCELLED"
    EMAIL_UNDELIVERABLE = "EMAIL_UNDELIVERABLE"
    EMAIL_DISPOSABLE = "EMAIL_DISPOSABLE"
    EMAIL_VERIFICATION_UNAVAILABLE = "EMAIL_VERIFICATION_UNAVAILABLE"
    CONVERSION_EVENT_CONFLICT = "CONVERSION_EVENT_CONFLICT"
    CONVERSION_NOT_FOUND = "CONVERSION_NOT_FOUND"
    REFERRAL_NOT_FOUND = "REFERRAL_NOT_FOUND"
    REFERRAL_NOT_HELD = "REFERRAL_NOT_HELD"
    EVENT_CURSOR_EXPIRED = "EVENT_CURSOR_EXPIRED"
    EVENT_CURSOR_UNKNOWN = "EVENT_CURSOR_UNKNOWN"
    WEBHOOK_ENDPOINT_NOT_FOUND = "WEBHOOK_ENDPOINT_NOT_FOUND"
    WEBHOOK_DELIVERY_NOT_FOUND = "WEBHOOK_DELIVERY_NOT_FOUND"
    WEBHOOK_URL_FORBIDDEN = "WEBHOOK_URL_FORBIDDEN"
    WEBHOOK_ENDPOINT_DISABLED = "WEBHOOK_ENDPOINT_DISABLED"
    # Sent by the HTTP/JSON gateway only (referral_service/gateway/).
    HTTP_ROUTE_NOT_FOUND = "HTTP_ROUTE_NOT_FOUND"
    HTTP_METHOD_NOT_ALLOWED = "HTTP_METHOD_NOT_ALLOWED"
    HTTP_REQUEST_TOO_LARGE = "HTTP_REQUEST_TOO_LARGE"
    HTTP_UNSUPPORTED_MEDIA_TYPE = "HTTP_UNSUPPORTED_MEDIA_TYPE"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: ``field`` is the proto field path (``email``, ``expire_time``)."""

    field: str
    description: str
    reason: str = "INVALID"


@dataclass
class DomainError(Exception):
    """Base of every expected failure. Subclasses fix the status category."""

    reason: Reason
    message: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: Sequence[FieldViolation] = ()
    #: For rate limits and outages: how long the client should wait.
    retry_after_seconds: float | None = None

    def __post_init__(self) -> None:
        Exception.__init__(self, self.message)

    def __str__(self) -> str:
        return self.message


class InvalidArgument(DomainError):
    @classmethod
    def fields(cls, *violations: FieldViolation, message: str | None = None) -> InvalidArgument:
        text = message or "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(Reason.VALIDATION_FAILED, text, violations=violations)


class NotFound(DomainError):
    pass


class AlreadyExists(DomainError):
    pass


class FailedPrecondition(DomainError):
    pass


class Unauthenticated(DomainError):
    pass


class PermissionDenied(DomainError):
    pass


class ResourceExhausted(DomainError):
    pass


class Unavailable(DomainError):
    pass


class OutOfRange(DomainError):
    pass


def check(violations: list[FieldViolation]) -> None:
    """Raise one INVALID_ARGUMENT listing every violation, if there are any."""
    if violations:
        raise InvalidArgument.fields(*violations)
