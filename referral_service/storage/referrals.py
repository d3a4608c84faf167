"""Referrals: the accounts a user referred, listed by keyset pagination on (referrer_id, id)
(the cost of a page does not depend on its depth), counted by the O(1) ``referral_count``."""

from __future__ import annotations

from sqlalchemy import bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain.models import Referral, ReferralState, ReviewState
from referral_service.storage.core import CODES, STATES, USERS

#: A referred user without a state row is PENDING (rows are made when a referral first changes).
_STATE = func.coalesce(STATES.c.state, ReferralState.PENDING.value)
_PAGE = (
    select(
        USERS.c.id,
        USERS.c.email,
        USERS.c.create_time,
        CODES.c.code,
        _STATE,
        STATES.c.review,
        STATES.c.qualify_time,
        STATES.c.reward_time,
    )
    .outerjoin(CODES, CODES.c.id == USERS.c.referral_code_id)
    .outerjoin(STATES, STATES.c.referee_id == USERS.c.id)
    .where(USERS.c.referrer_id == bindparam("referrer_id"), USERS.c.id > bindparam("after_id"))
    .order_by(USERS.c.id)
    .limit(bindparam("limit"))
)
_PAGE_IN_STATE = _PAGE.where(bindparam("state") == _STATE)
_COUNT = select(USERS.c.referral_count).where(USERS.c.id == bindparam("id"))


class SqlReferrals:
    """The ``Referrals`` port."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def page(
        self, referrer_id: int, after_id: int, limit: int, state: ReferralState | None = None
    ) -> list[Referral]:
        params: dict[str, object] = {"referrer_id": referrer_id, "after_id": after_id, "limit": limit}
        if state is not None:
            params["state"] = state.value
        result = await self._conn.execute(_PAGE if state is None else _PAGE_IN_STATE, params)
        return [
            Referral(
                user_id=user_id,
                email=email,
                join_time=joined,
                code=code or "",
                state=ReferralState(current),
                review=ReviewState(review) if review else None,
                qualify_time=qualify_time,
                reward_time=reward_time,
            )
            for user_id, email, joined, code, current, review, qualify_time, reward_time in result
        ]

    async def count(self, referrer_id: int) -> int | None:
        value = (await self._conn.execute(_COUNT, {"id": referrer_id})).scalar_one_or_none()
        return None if value is None else int(value)
