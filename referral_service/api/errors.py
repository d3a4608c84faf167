"""The one mapping from domain errors to ``google.rpc.Status`` (sent with grpcio-status as the
``grpc-status-details-bin`` trailer).

Every error carries exactly one ``ErrorInfo`` (reason from ``referral.v1.ErrorReason``, domain
``referral-service``) and a ``RequestInfo`` with the call's request id; invalid input adds
``BadRequest`` field violations, rate limits a ``QuotaFailure``, rate limits and outages a
``RetryInfo``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from referral_service.domain import errors as d

DOMAIN = "referral-service"

_CODES: dict[type[d.DomainError], grpc.StatusCode] = {
    d.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    d.NotFound: grpc.StatusCode.NOT_FOUND,
    d.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    d.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    d.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    d.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    d.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    d.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def build_status(
    code: grpc.StatusCode,
    message: str,
    *,
    reason: d.Reason,
    request_id: str,
    metadata: Mapping[str, str] | None = None,
    violations: Sequence[d.FieldViolation] = (),
    retry_after_seconds: float | None = None,
) -> grpc.Status:
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
    proto = status_pb2.Status(code=code.value[0], message=message, details=details)
    status = rpc_status.to_status(proto)
    return _Status(status.code, status.details, (*status.trailing_metadata, ("x-request-id", request_id)))


class _Status(grpc.Status):
    def __init__(
        self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, str | bytes], ...]
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def from_domain(error: d.DomainError, request_id: str) -> grpc.Status:
    code = next(
        (status for kind, status in _CODES.items() if isinstance(error, kind)),
        grpc.StatusCode.INTERNAL,
    )
    return build_status(
        code,
        error.message,
        reason=error.reason,
        request_id=request_id,
        metadata=error.metadata,
        violations=error.violations,
        retry_after_seconds=error.retry_after_seconds,
    )


def internal(request_id: str) -> grpc.Status:
    return build_status(
        grpc.StatusCode.INTERNAL,
        f"internal error; quote request id {request_id} to the operators",
        reason=d.Reason.INTERNAL_ERROR,
        request_id=request_id,
    )


def grpc_code_number(code: grpc.StatusCode) -> int:
    return int(code.value[0])


assert grpc_code_number(grpc.StatusCode.INVALID_ARGUMENT) == code_pb2.INVALID_ARGUMENT
