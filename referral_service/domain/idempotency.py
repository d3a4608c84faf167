"""AIP-155 request ids: a retry with the same ``request_id`` returns the first result."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from referral_service.domain.errors import FieldViolation, InvalidArgument, Reason
from referral_service.domain.ports import UnitOfWork

T = TypeVar("T")


def fingerprint(*parts: str) -> str:
    """What identifies a request's content, to tell a retry from another request."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


async def replay(
    uow: UnitOfWork,
    scope: str,
    request_id: str,
    fingerprint: str,
    now: datetime,
    load: Callable[[UnitOfWork, int], Awaitable[T]],
) -> T | None:
    """The result of the first request with this id (``load`` turns its resource id into the
    result), None if there was none, INVALID_ARGUMENT if the id was used for another request."""
    record = await uow.requests.get(scope, request_id, now)
    if record is None:
        return None
    if record.fingerprint != fingerprint:
        raise InvalidArgument(
            Reason.REQUEST_ID_CONFLICT,
            "request_id was already used for a different request",
            violations=[FieldViolation("request_id", "was used for a different request", "CONFLICT")],
        )
    return await load(uow, record.resource_id)
