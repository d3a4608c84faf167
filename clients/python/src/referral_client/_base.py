"""The exception every referral-service error becomes, with its google.rpc details as attributes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2

#: ``ErrorInfo.domain`` of every error this service returns.
DOMAIN = "referral-service"


@dataclass(frozen=True)
class FieldViolation:
    """One offending request field (``google.rpc.BadRequest.FieldViolation``)."""

    #: Path to the field, as in the request (``email``, ``ttl.seconds``).
    field: str
    #: What is wrong, for a person.
    description: str
    #: Machine-readable kind of problem (``REQUIRED``, ``TOO_LONG``, ...), where the server gives one.
    reason: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted quota (``google.rpc.QuotaFailure.Violation``)."""

    subject: str
    description: str
    quota_id: str
    quota_value: int


class ReferralError(grpc.aio.AioRpcError):
    """A failed call, decoded from the ``google.rpc.Status`` in the ``grpc-status-details-bin``
    trailer. It is still a ``grpc.aio.AioRpcError`` (``code()``, ``details()``,
    ``trailing_metadata()``), so existing ``except grpc.aio.AioRpcError`` handlers keep working.

    Catch a subclass per ``ErrorReason`` (``except EmailAlreadyRegistered``), or this class for
    any error that carries referral-service details; a reason this client does not know yet (a
    newer server) arrives as this class with ``reason`` set."""

    #: The ``ErrorReason`` name (without ``ERROR_REASON_``) this class stands for.
    REASON: ClassVar[str] = ""

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls.__module__ = "referral_client.errors"  # where they are imported from

    def __init__(self, error: grpc.aio.AioRpcError, status: status_pb2.Status) -> None:
        super().__init__(
            error.code(),
            error.initial_metadata(),
            error.trailing_metadata(),
            error.details(),
            error.debug_error_string(),
        )
        #: ``ErrorInfo.reason``: the ``ErrorReason`` name without ``ERROR_REASON_``.
        self.reason = ""
        #: ``ErrorInfo.domain``: ``referral-service``.
        self.domain = ""
        #: ``ErrorInfo.metadata``: more about this error, as documented on its reason.
        self.metadata: dict[str, str] = {}
        #: ``BadRequest.field_violations``: one per offending request field.
        self.field_violations: tuple[FieldViolation, ...] = ()
        #: ``RetryInfo.retry_delay``: how long to wait before trying again (rate limits).
        self.retry_delay: timedelta | None = None
        #: ``RequestInfo.request_id``: quote it to the service's operators; it is in their logs.
        self.request_id = ""
        #: ``QuotaFailure.violations``: which limit was hit.
        self.quota_violations: tuple[QuotaViolation, ...] = ()
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                self.reason, self.domain, self.metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.field_violations = tuple(
                    FieldViolation(v.field, v.description, v.reason) for v in bad.field_violations
                )
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                self.retry_delay = retry.retry_delay.ToTimedelta()
            elif detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
                request = error_details_pb2.RequestInfo()
                detail.Unpack(request)
                self.request_id = request.request_id
            elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                quota = error_details_pb2.QuotaFailure()
                detail.Unpack(quota)
                self.quota_violations = tuple(
                    QuotaViolation(v.subject, v.description, v.quota_id, v.quota_value)
                    for v in quota.violations
                )

    @property
    def fields(self) -> dict[str, str]:
        """The field violations as ``{field: description}``."""
        return {v.field: v.description for v in self.field_violations}
