"""AIP-155 request ids: a retry with the same ``request_id`` returns the first result."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from referral_service.domain.clock import utcnow
from referral_service.domain.errors import FieldViolation, InvalidArgument, Reason
from referral_service.storage import repositories as repo
from referral_service.storage.db import Database

T = TypeVar("T")


async def replay(
    db: Database,
    scope: str,
    request_id: str,
    fingerprint: str,
    load: Callable[[AsyncSession, int], Awaitable[T]],
) -> T | None:
    """The result of the first request with this id (``load`` turns its resource id into the
    result), None if there was none, INVALID_ARGUMENT if the id was used for another request."""
    async with db.read() as session:
        record = await repo.idempotent_result(session, scope, request_id, utcnow())
        if record is None:
            return None
        if record.fingerprint != fingerprint:
            raise InvalidArgument(
                Reason.REQUEST_ID_CONFLICT,
                "request_id was already used for a different request",
                violations=[FieldViolation("request_id", "was used for a different request", "CONFLICT")],
            )
        return await load(session, record.resource_id)
