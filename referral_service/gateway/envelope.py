"""The AIP-193 error envelope: ``{"error": {"code", "message", "status", "details"}}``.

``code`` is the HTTP status (from the mapping documented in ``google/rpc/code.proto``),
``status`` the gRPC code name, ``details`` the ``google.rpc.Status`` details from the
``grpc-status-details-bin`` trailer, each as protobuf JSON with its ``@type``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from referral_service.api.errors import DOMAIN
from referral_service.gateway.jsonmap import Violation

#: gRPC code -> HTTP status, as documented in google/rpc/code.proto.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def envelope(
    http_status: int, code: grpc.StatusCode, message: str, details: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "error": {
            "code": http_status,
            "message": message,
            "status": code.name,
            "details": list(details),
        }
    }


def details_from_trailers(trailers: Sequence[tuple[str, str | bytes]] | None) -> tuple[str | None, list[Any]]:
    """The status message and the unpacked details of ``grpc-status-details-bin``, if sent."""
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            return status.message, list(status.details)
    return None, []


def detail_json(detail: Any) -> dict[str, Any]:
    """One ``google.protobuf.Any`` -> JSON with ``@type``; an unknown type keeps its bytes."""
    try:
        return dict(json_format.MessageToDict(detail, preserving_proto_field_name=False))
    except (TypeError, KeyError, json_format.Error):
        return {"@type": detail.type_url, "value": json_format.MessageToDict(detail).get("value", "")}


def from_rpc_error(
    code: grpc.StatusCode, message: str, trailers: Sequence[tuple[str, str | bytes]] | None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, envelope and extra headers (Retry-After, WWW-Authenticate) for a failed RPC."""
    status_message, details = details_from_trailers(trailers)
    headers: dict[str, str] = {}
    reason = ""
    for detail in details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            seconds = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            headers["retry-after"] = str(max(1, math.ceil(seconds)))
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            error_info = error_details_pb2.ErrorInfo()
            detail.Unpack(error_info)
            reason = error_info.reason
    if code is grpc.StatusCode.UNAUTHENTICATED:
        # RFC 6750 section 3: a missing token gets the bare challenge, a bad one an error code.
        headers["www-authenticate"] = (
            'Bearer realm="referral-service"'
            if reason in ("TOKEN_MISSING", "")
            else 'Bearer realm="referral-service", error="invalid_token"'
        )
    http_status = HTTP_STATUS.get(code, 500)
    return (
        http_status,
        envelope(http_status, code, status_message or message, [detail_json(d) for d in details]),
        headers,
    )


def code_from_number(number: int) -> grpc.StatusCode:
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def gateway_error(
    http_status: int,
    code: grpc.StatusCode,
    message: str,
    *,
    reason: str,
    request_id: str,
    violations: Sequence[Violation] = (),
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """An error raised by the gateway itself, shaped exactly like the server's: one ErrorInfo,
    BadRequest field violations when there are any, and a RequestInfo."""
    error_info: dict[str, Any] = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": DOMAIN,
    }
    if metadata:
        error_info["metadata"] = dict(metadata)
    details: list[dict[str, Any]] = [error_info]
    if violations:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [
                    {"field": item.field, "description": item.description, "reason": item.reason}
                    for item in violations
                ],
            }
        )
    details.append({"@type": "type.googleapis.com/google.rpc.RequestInfo", "requestId": request_id})
    return envelope(http_status, code, message, details)
