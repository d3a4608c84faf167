"""Read the rich error details (google.rpc.Status) of a failed call."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class RichError:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    fields: dict[str, str]
    field_reasons: dict[str, str]
    request_id: str
    retry_seconds: float | None
    error_infos: int
    #: QuotaFailure violations: (subject, quota_id, quota_value)
    quota: list[tuple[str, str, int]]


def rich(error: grpc.aio.AioRpcError) -> RichError:
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status details on {error.code()}: {error.details()}"
    infos, fields, field_reasons = [], {}, {}
    request_id, retry = "", None
    quota: list[tuple[str, str, int]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for violation in bad.field_violations:
                fields[violation.field] = violation.description
                field_reasons[violation.field] = violation.reason
        elif detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
            info_r = error_details_pb2.RequestInfo()
            detail.Unpack(info_r)
            request_id = info_r.request_id
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            quota += [(v.subject, v.quota_id, v.quota_value) for v in failure.violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry_info = error_details_pb2.RetryInfo()
            detail.Unpack(retry_info)
            retry = retry_info.retry_delay.ToTimedelta().total_seconds()
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {len(infos)}"
    return RichError(
        code=error.code(),
        message=error.details() or "",
        reason=infos[0].reason,
        domain=infos[0].domain,
        metadata=dict(infos[0].metadata),
        fields=fields,
        field_reasons=field_reasons,
        request_id=request_id,
        retry_seconds=retry,
        error_infos=len(infos),
        quota=quota,
    )


async def expect_error(awaitable: object, code: grpc.StatusCode, reason: str | None = None) -> RichError:
    try:
        await awaitable  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        details = rich(error)
        assert details.code == code, f"expected {code}, got {details.code}: {details.message}"
        if reason is not None:
            assert details.reason == reason, (
                f"expected reason {reason}, got {details.reason}: {details.message}"
            )
        assert details.domain == "referral-service"
        assert details.request_id
        return details
    raise AssertionError(f"expected {code}, the call succeeded")
