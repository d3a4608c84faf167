"""AIP-155 request ids, per scope: what the first request was (its fingerprint) and what it
made, kept until they expire. The primary key (scope, request_id) decides concurrent firsts."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain.ports import RememberedRequest
from referral_service.storage.core import REQUESTS, at, write

_KEY = (REQUESTS.c.scope == bindparam("scope"), REQUESTS.c.request_id == bindparam("request_id"))
_GET = select(REQUESTS.c.fingerprint, REQUESTS.c.resource_id).where(*_KEY, REQUESTS.c.expire_time > at("now"))
_FORGET_EXPIRED = delete(REQUESTS).where(*_KEY, REQUESTS.c.expire_time <= at("now"))
_INSERT = insert(REQUESTS)


class SqlRequests:
    """The ``Requests`` port."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def get(self, scope: str, request_id: str, now: datetime) -> RememberedRequest | None:
        row = (
            await self._conn.execute(_GET, {"scope": scope, "request_id": request_id, "now": now})
        ).one_or_none()
        if row is None:
            return None
        fingerprint, resource_id = row
        return RememberedRequest(fingerprint=fingerprint, resource_id=resource_id)

    async def remember(
        self,
        *,
        scope: str,
        request_id: str,
        fingerprint: str,
        resource_id: int,
        now: datetime,
        expire_time: datetime,
    ) -> None:
        # An expired record of the same id is forgotten; a live one makes the insert conflict.
        await self._conn.execute(_FORGET_EXPIRED, {"scope": scope, "request_id": request_id, "now": now})
        await write(
            self._conn,
            _INSERT,
            {
                "scope": scope,
                "request_id": request_id,
                "fingerprint": fingerprint,
                "resource_id": resource_id,
                "create_time": now,
                "expire_time": expire_time,
            },
        )
