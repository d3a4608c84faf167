"""Accounts (the ``users`` table), each read with its enrichment profile when it has one."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, false, insert, select, true, update
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain.models import EmailStatus, User
from referral_service.domain.ports import Credentials, NewUser
from referral_service.storage.core import PROFILES, USERS, at, write
from referral_service.storage.profiles import PROFILE_COLUMNS, profile_model

_USER_COLUMNS = (
    USERS.c.id,
    USERS.c.email,
    USERS.c.is_active,
    USERS.c.is_verified,
    USERS.c.is_superuser,
    USERS.c.referrer_id,
    USERS.c.create_time,
    USERS.c.email_verification,
    USERS.c.email_verify_time,
    USERS.c.verify_time,
)
_WITH_PROFILE = select(*_USER_COLUMNS, *PROFILE_COLUMNS).outerjoin(PROFILES, PROFILES.c.user_id == USERS.c.id)
_BY_ID = _WITH_PROFILE.where(USERS.c.id == bindparam("user_id"))
_BY_EMAIL_KEY = _WITH_PROFILE.where(USERS.c.email_key == bindparam("email_key"))
#: Login: one indexed look-up of what a password check needs.
_CREDENTIALS = select(USERS.c.id, USERS.c.password_hash, USERS.c.is_active).where(
    USERS.c.email_key == bindparam("email_key")
)
_INSERT = insert(USERS).returning(USERS.c.id)
_SET_PASSWORD_HASH = (
    update(USERS)
    .where(USERS.c.id == bindparam("user_id"))
    .values(password_hash=bindparam("hash"), update_time=at("now"))
)
_MAKE_SUPERUSER = (
    update(USERS).where(USERS.c.id == bindparam("user_id")).values(is_superuser=true(), update_time=at("now"))
)
_MARK_VERIFIED = (
    update(USERS)
    .where(USERS.c.id == bindparam("user_id"), USERS.c.is_verified == false())
    .values(is_verified=true(), verify_time=at("now"), update_time=at("now"))
)
_COUNT_REFERRAL = (
    update(USERS).where(USERS.c.id == bindparam("user_id")).values(referral_count=USERS.c.referral_count + 1)
)


def _user(row: Sequence[Any]) -> User:
    (
        user_id,
        email,
        is_active,
        is_verified,
        is_superuser,
        referrer_id,
        create_time,
        verification,
        check_time,
        verify_time,
    ) = row[: len(_USER_COLUMNS)]
    return User(
        id=user_id,
        email=email,
        is_active=is_active,
        is_verified=is_verified,
        is_superuser=is_superuser,
        referrer_id=referrer_id,
        create_time=create_time,
        email_verification=EmailStatus(verification) if verification is not None else None,
        email_verify_time=check_time,
        verify_time=verify_time,
        profile=profile_model(row, len(_USER_COLUMNS)),
    )


class SqlUsers:
    """The ``Users`` port."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(self, user: NewUser, now: datetime) -> User:
        now = now.astimezone(UTC)
        verify_time = user.email_verify_time.astimezone(UTC) if user.email_verify_time else None
        result = await write(
            self._conn,
            _INSERT,
            {
                "email": user.email,
                "email_key": user.email_key,
                "password_hash": user.password_hash,
                "is_active": True,
                "is_verified": user.is_verified,
                "is_superuser": user.is_superuser,
                "referrer_id": user.referrer_id,
                "referral_code_id": user.referral_code_id,
                "referral_count": 0,
                "create_time": now,
                "update_time": now,
                "email_verification": user.email_verification,
                "email_verify_time": verify_time,
                "verify_time": now if user.is_verified else None,
            },
        )
        return User(
            id=int(result.scalar_one()),
            email=user.email,
            is_active=True,
            is_verified=user.is_verified,
            is_superuser=user.is_superuser,
            referrer_id=user.referrer_id,
            create_time=now,
            email_verification=(
                EmailStatus(user.email_verification) if user.email_verification is not None else None
            ),
            email_verify_time=verify_time,
            verify_time=now if user.is_verified else None,
        )

    async def get(self, user_id: int) -> User | None:
        row = (await self._conn.execute(_BY_ID, {"user_id": user_id})).one_or_none()
        return None if row is None else _user(row)

    async def by_email_key(self, email_key: str) -> User | None:
        row = (await self._conn.execute(_BY_EMAIL_KEY, {"email_key": email_key})).one_or_none()
        return None if row is None else _user(row)

    async def credentials(self, email_key: str) -> Credentials | None:
        row = (await self._conn.execute(_CREDENTIALS, {"email_key": email_key})).one_or_none()
        if row is None:
            return None
        user_id, password_hash, is_active = row
        return Credentials(user_id=user_id, password_hash=password_hash, is_active=is_active)

    async def set_password_hash(self, user_id: int, password_hash: str, now: datetime) -> None:
        await self._conn.execute(_SET_PASSWORD_HASH, {"user_id": user_id, "hash": password_hash, "now": now})

    async def make_superuser(self, user_id: int, now: datetime) -> User | None:
        await self._conn.execute(_MAKE_SUPERUSER, {"user_id": user_id, "now": now})
        return await self.get(user_id)

    async def mark_verified(self, user_id: int, now: datetime) -> bool:
        result = await self._conn.execute(_MARK_VERIFIED, {"user_id": user_id, "now": now})
        return result.rowcount == 1

    async def count_referral(self, referrer_id: int) -> None:
        await self._conn.execute(_COUNT_REFERRAL, {"user_id": referrer_id})
