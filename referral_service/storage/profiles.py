"""Enrichment jobs and their results: one ``user_profiles`` row per user, both the durable
job (``state`` = ``pending`` with its next attempt time, which doubles as the lease of the
worker that claimed it) and its outcome."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, case, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain.models import Profile, ProfileState
from referral_service.domain.ports import PersonData, ProfileClaim
from referral_service.storage.core import PROFILES, USERS, at, write

_PENDING = ProfileState.PENDING.value

#: The columns a ``Profile`` is made of, in the order ``profile_model`` reads them.
PROFILE_COLUMNS = (
    PROFILES.c.state,
    PROFILES.c.full_name,
    PROFILES.c.company,
    PROFILES.c.title,
    PROFILES.c.location,
    PROFILES.c.avatar_uri,
    PROFILES.c.source,
    PROFILES.c.fetch_time,
)


def profile_model(row: Sequence[Any], start: int = 0) -> Profile | None:
    """The profile in ``row[start:start + len(PROFILE_COLUMNS)]``; None when there is none
    (an outer join found no profile row)."""
    state, full_name, company, title, location, avatar_uri, source, fetch_time = row[
        start : start + len(PROFILE_COLUMNS)
    ]
    if state is None:
        return None
    return Profile(
        state=ProfileState(state),
        full_name=full_name,
        company=company,
        title=title,
        location=location,
        avatar_uri=avatar_uri,
        source=source,
        fetch_time=fetch_time,
    )


_INSERT = insert(PROFILES)
_DUE = (
    select(PROFILES.c.user_id)
    .where(PROFILES.c.state == _PENDING, PROFILES.c.next_attempt_time <= at("now"))
    .order_by(PROFILES.c.next_attempt_time)
    .limit(bindparam("limit"))
)
_NEXT_DUE_TIME = select(func.min(PROFILES.c.next_attempt_time)).where(
    PROFILES.c.state == _PENDING,
    PROFILES.c.user_id.not_in(bindparam("exclude", expanding=True)),
)
_CLAIM = (
    update(PROFILES)
    .where(
        PROFILES.c.user_id == bindparam("id"),
        PROFILES.c.state == _PENDING,
        PROFILES.c.next_attempt_time <= at("now"),
    )
    .values(
        next_attempt_time=at("lease_until"),
        attempts=PROFILES.c.attempts + 1,
        update_time=at("now"),
    )
    .returning(PROFILES.c.attempts)
)
_EMAIL = select(USERS.c.email).where(USERS.c.id == bindparam("id"))
_RESCHEDULE = (
    update(PROFILES)
    .where(PROFILES.c.user_id == bindparam("id"), PROFILES.c.state == _PENDING)
    .values(next_attempt_time=at("next_time"), last_error=bindparam("error"), update_time=at("now"))
)
_RELEASE = (
    update(PROFILES)
    .where(PROFILES.c.user_id.in_(bindparam("ids", expanding=True)), PROFILES.c.state == _PENDING)
    .values(
        next_attempt_time=at("now"),
        # The interrupted attempt does not count.
        attempts=case((PROFILES.c.attempts > 0, PROFILES.c.attempts - 1), else_=0),
        update_time=at("now"),
    )
)


def _error(text: str) -> str | None:
    return text[:200] or None


class SqlProfiles:
    """The ``Profiles`` port."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add_job(self, user_id: int, now: datetime) -> Profile:
        await write(
            self._conn,
            _INSERT,
            {
                "user_id": user_id,
                "state": _PENDING,
                "attempts": 0,
                "next_attempt_time": now,
                "create_time": now,
                "update_time": now,
            },
        )
        return Profile(state=ProfileState.PENDING)

    async def due(self, now: datetime, limit: int) -> list[int]:
        result = await self._conn.execute(_DUE, {"now": now, "limit": limit})
        return [int(user_id) for user_id in result.scalars()]

    async def next_due_time(self, exclude: Sequence[int] = ()) -> datetime | None:
        result = await self._conn.execute(_NEXT_DUE_TIME, {"exclude": list(exclude)})
        value: datetime | None = result.scalar()
        return value

    async def claim(self, user_id: int, now: datetime, lease_until: datetime) -> ProfileClaim | None:
        result = await self._conn.execute(_CLAIM, {"id": user_id, "now": now, "lease_until": lease_until})
        attempts = result.scalar_one_or_none()
        if attempts is None:
            return None
        email = (await self._conn.execute(_EMAIL, {"id": user_id})).scalar_one_or_none()
        if email is None:
            return None
        return ProfileClaim(email=email, attempts=int(attempts))

    async def finish(
        self,
        user_id: int,
        state: ProfileState,
        now: datetime,
        *,
        source: str,
        person: PersonData | None = None,
        error: str = "",
    ) -> None:
        values: dict[str, object] = {
            "state": state.value,
            "next_attempt_time": None,
            "source": source,
            "fetch_time": now,
            "update_time": now,
            "last_error": _error(error),
        }
        if person is not None:
            values.update(
                full_name=person.full_name,
                company=person.company,
                title=person.title,
                location=person.location,
                avatar_uri=person.avatar_uri,
            )
        await self._conn.execute(
            update(PROFILES).where(PROFILES.c.user_id == user_id, PROFILES.c.state == _PENDING).values(values)
        )

    async def reschedule(self, user_id: int, now: datetime, next_time: datetime, *, error: str) -> None:
        await self._conn.execute(
            _RESCHEDULE, {"id": user_id, "now": now, "next_time": next_time, "error": _error(error)}
        )

    async def release(self, user_ids: Sequence[int], now: datetime) -> None:
        if user_ids:
            await self._conn.execute(_RELEASE, {"ids": list(user_ids), "now": now})
