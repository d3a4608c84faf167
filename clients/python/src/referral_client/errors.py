"""Typed exceptions for referral-service errors.

Every error the service returns carries one ``google.rpc.ErrorInfo`` whose ``reason`` names a
``referral.v1.ErrorReason`` value; :func:`from_rpc_error` turns a failed call into the exception
class of that reason (``EmailAlreadyRegistered``, ``RateLimited``, ...), a subclass of
:class:`ReferralError`, itself a ``grpc.aio.AioRpcError``. Channels made by
:func:`referral_client.connect` raise them for you.
"""

from __future__ import annotations

import grpc
from grpc_status import rpc_status

from referral_client._base import DOMAIN as DOMAIN
from referral_client._base import FieldViolation as FieldViolation
from referral_client._base import QuotaViolation as QuotaViolation
from referral_client._base import ReferralError as ReferralError
from referral_client._reasons import *  # noqa: F403  (one class per ErrorReason, all re-exported)
from referral_client._reasons import BY_REASON


def from_rpc_error(error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """The typed exception for a failed call: the class of its ``ErrorInfo.reason``, plain
    :class:`ReferralError` for a reason this client does not know yet, and ``error`` itself
    when the call carries no referral-service details (a transport failure such as
    ``UNAVAILABLE`` before the call reached the service, or another service's error)."""
    if isinstance(error, ReferralError):
        return error
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # details that contradict the status code: not ours
        return error
    if status is None:
        return error
    typed = ReferralError(error, status)
    if typed.domain != DOMAIN:
        return error
    cls = BY_REASON.get(typed.reason)
    return cls(error, status) if cls is not None else typed
