"""Referrals: the accounts a user referred, listed by keyset pagination on (referrer_id, id)
(the cost of a page does not depend on its depth), counted by the O(1) ``referral_count``."""

from __future__ import annotations

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain.models import Referral
from referral_service.storage.core import CODES, USERS

_PAGE = (
    select(USERS.c.id, USERS.c.email, USERS.c.create_time, CODES.c.code)
    .outerjoin(CODES, CODES.c.id == USERS.c.referral_code_id)
    .where(USERS.c.referrer_id == bindparam("referrer_id"), USERS.c.id > bindparam("after_id"))
    .order_by(USERS.c.id)
    .limit(bindparam("limit"))
)
_COUNT = select(USERS.c.referral_count).where(USERS.c.id == bindparam("id"))


class SqlReferrals:
    """The ``Referrals`` port."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def page(self, referrer_id: int, after_id: int, limit: int) -> list[Referral]:
        result = await self._conn.execute(
            _PAGE, {"referrer_id": referrer_id, "after_id": after_id, "limit": limit}
        )
        return [
            Referral(user_id=user_id, email=email, join_time=joined, code=code or "")
            for user_id, email, joined, code in result
        ]

    async def count(self, referrer_id: int) -> int | None:
        value = (await self._conn.execute(_COUNT, {"id": referrer_id})).scalar_one_or_none()
        return None if value is None else int(value)
