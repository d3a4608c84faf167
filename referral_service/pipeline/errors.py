"""The one mapping from how a call failed to the ``google.rpc.Status`` the client gets.

Every error carries exactly one ``ErrorInfo`` (reason from ``referral.v1.ErrorReason``, domain
``referral-service``) and a ``RequestInfo`` with the call's request id; invalid input adds
``BadRequest`` field violations, rate limits a ``QuotaFailure``, rate limits and outages a
``RetryInfo``. An unexpected exception becomes INTERNAL with the request id: it is logged with
its traceback, never sent. Cancellation propagates untouched.

gRPC sends the status as the ``grpc-status-details-bin`` trailer (grpcio-status), the HTTP
gateway as the AIP-193 JSON envelope with ``HTTP_STATUS[code]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from referral_service.domain import errors as d
from referral_service.pipeline.call import Call, CallFailed, Handler

log = logging.getLogger("referral_service.api")

DOMAIN = "referral-service"

OK: int = code_pb2.OK
CANCELLED: int = code_pb2.CANCELLED
UNKNOWN: int = code_pb2.UNKNOWN
INVALID_ARGUMENT: int = code_pb2.INVALID_ARGUMENT
DEADLINE_EXCEEDED: int = code_pb2.DEADLINE_EXCEEDED
NOT_FOUND: int = code_pb2.NOT_FOUND
UNAUTHENTICATED: int = code_pb2.UNAUTHENTICATED
RESOURCE_EXHAUSTED: int = code_pb2.RESOURCE_EXHAUSTED
UNIMPLEMENTED: int = code_pb2.UNIMPLEMENTED
INTERNAL: int = code_pb2.INTERNAL
UNAVAILABLE: int = code_pb2.UNAVAILABLE

#: ``google.rpc.Code`` number -> name (``INVALID_ARGUMENT``), as gRPC names its status codes.
CODE_NAMES: dict[int, str] = {
    value.number: value.name for value in code_pb2.DESCRIPTOR.enum_types_by_name["Code"].values
}
#: ``google.rpc.Code`` number -> HTTP status, as documented in google/rpc/code.proto.
HTTP_STATUS: dict[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}

_CODES: dict[type[d.DomainError], int] = {
    d.InvalidArgument: code_pb2.INVALID_ARGUMENT,
    d.NotFound: code_pb2.NOT_FOUND,
    d.AlreadyExists: code_pb2.ALREADY_EXISTS,
    d.FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    d.Unauthenticated: code_pb2.UNAUTHENTICATED,
    d.PermissionDenied: code_pb2.PERMISSION_DENIED,
    d.ResourceExhausted: code_pb2.RESOURCE_EXHAUSTED,
    d.Unavailable: code_pb2.UNAVAILABLE,
    d.OutOfRange: code_pb2.OUT_OF_RANGE,
}


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def build_status(
    code: int,
    message: str,
    *,
    reason: d.Reason,
    request_id: str,
    metadata: Mapping[str, str] | None = None,
    violations: Sequence[d.FieldViolation] = (),
    retry_after_seconds: float | None = None,
) -> status_pb2.Status:
    details = [
        _pack(error_details_pb2.ErrorInfo(reason=reason.value, domain=DOMAIN, metadata=dict(metadata or {})))
    ]
    if violations:
        details.append(
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=item.field, description=item.description, reason=item.reason
                        )
                        for item in violations
                    ]
                )
            )
        )
    if metadata and "quota_limit" in metadata:
        # The standard detail for quota errors (AIP-193), beside ErrorInfo's metadata.
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=metadata.get("quota_subject", ""),
                            description=message,
                            api_service=DOMAIN,
                            quota_id=metadata["quota_limit"],
                            quota_value=int(metadata.get("quota_limit_value", "0")),
                        )
                    ]
                )
            )
        )
    if retry_after_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(int(retry_after_seconds * 1000), 1))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    details.append(_pack(error_details_pb2.RequestInfo(request_id=request_id)))
    return status_pb2.Status(code=code, message=message, details=details)


def from_domain(error: d.DomainError, request_id: str) -> status_pb2.Status:
    code = next((status for kind, status in _CODES.items() if isinstance(error, kind)), code_pb2.INTERNAL)
    return build_status(
        code,
        error.message,
        reason=error.reason,
        request_id=request_id,
        metadata=error.metadata,
        violations=error.violations,
        retry_after_seconds=error.retry_after_seconds,
    )


def internal(request_id: str) -> status_pb2.Status:
    return build_status(
        code_pb2.INTERNAL,
        f"internal error; quote request id {request_id} to the operators",
        reason=d.Reason.INTERNAL_ERROR,
        request_id=request_id,
    )


def failed(call: Call, status: status_pb2.Status, reason: str) -> CallFailed:
    """Record the outcome on the call (for the access line) and wrap the status to raise."""
    call.code = status.code
    call.reason = reason
    return CallFailed(status)


def stage(inner: Handler) -> Handler:
    """DomainError -> its status; any other exception -> INTERNAL (logged, not sent)."""

    async def mapped(request: Any, call: Call) -> Any:
        try:
            return await inner(request, call)
        except d.DomainError as error:
            raise failed(call, from_domain(error, call.request_id), error.reason.value) from None
        except CallFailed:
            raise
        except Exception:
            log.exception("unhandled error in %s", call.method, extra={"request_id": call.request_id})
            raise failed(call, internal(call.request_id), d.Reason.INTERNAL_ERROR.value) from None

    return mapped
