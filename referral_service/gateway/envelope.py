"""The AIP-193 error envelope: ``{"error": {"code", "message", "status", "details"}}``.

``code`` is the HTTP status (from the mapping documented in ``google/rpc/code.proto``),
``status`` the gRPC code name, ``details`` the ``google.rpc.Status`` details, each as protobuf
JSON with its ``@type``: the same status a gRPC client gets in ``grpc-status-details-bin``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from referral_service.gateway.jsonmap import Violation
from referral_service.pipeline.errors import CODE_NAMES, DOMAIN, HTTP_STATUS, UNAUTHENTICATED


def envelope(http_status: int, code: int, message: str, details: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {
        "error": {
            "code": http_status,
            "message": message,
            "status": CODE_NAMES.get(code, "UNKNOWN"),
            "details": list(details),
        }
    }


def detail_json(detail: Any) -> dict[str, Any]:
    """One ``google.protobuf.Any`` -> JSON with ``@type``; an unknown type keeps its bytes."""
    try:
        return dict(json_format.MessageToDict(detail, preserving_proto_field_name=False))
    except (TypeError, KeyError, json_format.Error):
        return {"@type": detail.type_url, "value": json_format.MessageToDict(detail).get("value", "")}


def from_status(status: status_pb2.Status) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, envelope and extra headers (Retry-After, WWW-Authenticate) for a failed call."""
    headers: dict[str, str] = {}
    reason = ""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            seconds = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            headers["retry-after"] = str(max(1, math.ceil(seconds)))
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            error_info = error_details_pb2.ErrorInfo()
            detail.Unpack(error_info)
            reason = error_info.reason
    if status.code == UNAUTHENTICATED:
        # RFC 6750 section 3: a missing token gets the bare challenge, a bad one an error code.
        headers["www-authenticate"] = (
            'Bearer realm="referral-service"'
            if reason in ("TOKEN_MISSING", "")
            else 'Bearer realm="referral-service", error="invalid_token"'
        )
    http_status = HTTP_STATUS.get(status.code, 500)
    body = envelope(
        http_status,
        status.code,
        status.message or CODE_NAMES.get(status.code, "UNKNOWN"),
        [detail_json(d) for d in status.details],
    )
    return http_status, body, headers


def gateway_error(
    http_status: int,
    code: int,
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
