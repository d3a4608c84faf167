"""Referral codes. The schema keeps the invariants: a code key (the code upper-cased) is held by
one code at a time (``code_key`` unique), and at most one *open* code per owner (a partial
unique index on ``owner_id`` where ``close_time IS NULL``). A closed code gives its key up only
to a new code of the same owner, in the transaction that inserts it (``reclaim``): its
``code_key`` becomes NULL (only closed codes may have none) and it keeps ``code`` as history."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Executable, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain.models import ReferralCode
from referral_service.domain.ports import CODE_TAKEN, OPEN_CODE_EXISTS, Conflict, NewCode
from referral_service.storage.core import CODES, USERS, at, write

#: The one definition of a *live* code at ``:now``: open, unrevoked, unexpired, not used up.
_LIVE = and_(
    CODES.c.close_time.is_(None),
    CODES.c.revoke_time.is_(None),
    CODES.c.expire_time > at("now"),
    or_(CODES.c.max_uses == 0, CODES.c.use_count < CODES.c.max_uses),
)
#: An open code that can never be used again (expired or used up) still holds its owner's slot.
_DEAD = or_(
    CODES.c.expire_time <= at("now"),
    and_(CODES.c.max_uses > 0, CODES.c.use_count >= CODES.c.max_uses),
)

_COLUMNS = (
    CODES.c.id,
    CODES.c.code,
    CODES.c.owner_id,
    CODES.c.create_time,
    CODES.c.expire_time,
    CODES.c.revoke_time,
    CODES.c.max_uses,
    CODES.c.use_count,
)
_SELECT = select(*_COLUMNS)
_BY_ID = _SELECT.where(CODES.c.id == bindparam("code_id"))
_BY_KEY = _SELECT.where(CODES.c.code_key == bindparam("code_key"))
_OPEN = _SELECT.where(CODES.c.owner_id == bindparam("owner"), CODES.c.close_time.is_(None))
#: The hot cached read (code by email), on a miss.
_LIVE_BY_EMAIL_KEY = _SELECT.join(USERS, USERS.c.id == CODES.c.owner_id).where(
    USERS.c.email_key == bindparam("email_key"), _LIVE
)
_INSERT = insert(CODES).returning(CODES.c.id)
_CLOSE_DEAD = (
    update(CODES)
    .where(CODES.c.owner_id == bindparam("owner"), CODES.c.close_time.is_(None), _DEAD)
    .values(close_time=at("now"))
)
_REVOKE_OPEN = (
    update(CODES)
    .where(CODES.c.owner_id == bindparam("owner"), CODES.c.close_time.is_(None))
    .values(revoke_time=func.coalesce(CODES.c.revoke_time, at("now")), close_time=at("now"))
    .returning(*_COLUMNS)
)
_RECLAIM = (
    update(CODES)
    .where(
        CODES.c.code_key == bindparam("key"),
        CODES.c.owner_id == bindparam("owner"),
        CODES.c.close_time.is_not(None),
    )
    .values(code_key=None)
)
#: The condition and the increment are one statement (a row lock on PostgreSQL, the write
#: lock on SQLite): concurrent claims never push ``use_count`` past ``max_uses``.
_CLAIM_USE = (
    update(CODES).where(CODES.c.id == bindparam("code_id"), _LIVE).values(use_count=CODES.c.use_count + 1)
)


def _code(row: Sequence[Any]) -> ReferralCode:
    code_id, code, owner_id, create_time, expire_time, revoke_time, max_uses, use_count = row
    return ReferralCode(
        id=code_id,
        code=code,
        owner_id=owner_id,
        create_time=create_time,
        expire_time=expire_time,
        revoke_time=revoke_time,
        max_uses=max_uses,
        use_count=use_count,
    )


class SqlCodes:
    """The ``Codes`` port."""

    __slots__ = ("_conn", "_dialect")

    def __init__(self, conn: AsyncConnection, dialect: str) -> None:
        self._conn = conn
        self._dialect = dialect

    async def _one(self, statement: Executable, params: dict[str, Any]) -> ReferralCode | None:
        row = (await self._conn.execute(statement, params)).one_or_none()
        return None if row is None else _code(row)

    async def add(self, code: NewCode, now: datetime) -> ReferralCode:
        now, expire_time = now.astimezone(UTC), code.expire_time.astimezone(UTC)
        try:
            result = await write(
                self._conn,
                _INSERT,
                {
                    "code": code.code,
                    "code_key": code.code_key,
                    "owner_id": code.owner_id,
                    "create_time": now,
                    "expire_time": expire_time,
                    "max_uses": code.max_uses,
                    "use_count": 0,
                },
            )
        except Conflict as conflict:
            # When both are broken, a taken code is the one to report. PostgreSQL checks the
            # code's constraint first; SQLite checks the open-slot index first, and its
            # transaction (holding the write lock) can still look the code up.
            if (
                conflict.constraint == OPEN_CODE_EXISTS
                and self._dialect == "sqlite"
                and await self.by_key(code.code_key) is not None
            ):
                raise Conflict(CODE_TAKEN) from conflict
            raise
        return ReferralCode(
            id=int(result.scalar_one()),
            code=code.code,
            owner_id=code.owner_id,
            create_time=now,
            expire_time=expire_time,
            revoke_time=None,
            max_uses=code.max_uses,
            use_count=0,
        )

    async def get(self, code_id: int) -> ReferralCode | None:
        return await self._one(_BY_ID, {"code_id": code_id})

    async def by_key(self, code_key: str) -> ReferralCode | None:
        return await self._one(_BY_KEY, {"code_key": code_key})

    async def open_code(self, owner_id: int) -> ReferralCode | None:
        return await self._one(_OPEN, {"owner": owner_id})

    async def close_dead(self, owner_id: int, now: datetime) -> None:
        await self._conn.execute(_CLOSE_DEAD, {"owner": owner_id, "now": now})

    async def revoke_open(self, owner_id: int, now: datetime) -> ReferralCode | None:
        return await self._one(_REVOKE_OPEN, {"owner": owner_id, "now": now})

    async def reclaim(self, owner_id: int, code_key: str) -> bool:
        result = await self._conn.execute(_RECLAIM, {"owner": owner_id, "key": code_key})
        return result.rowcount > 0

    async def live_by_email_key(self, email_key: str, now: datetime) -> ReferralCode | None:
        return await self._one(_LIVE_BY_EMAIL_KEY, {"email_key": email_key, "now": now})

    async def claim_use(self, code_id: int, now: datetime) -> bool:
        result = await self._conn.execute(_CLAIM_USE, {"code_id": code_id, "now": now})
        return result.rowcount > 0
