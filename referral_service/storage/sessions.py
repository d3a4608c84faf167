"""Login sessions: their refresh tokens (one family per session) and the durable revocation
records (``jti:<id>`` for an access token, ``sid:<id>`` for a session), kept until they expire.
Redis or the in-process copy serve the hot revocation check; this table survives their
restarts and answers when they cannot."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import bindparam, exists, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain.ports import RefreshTokenRecord
from referral_service.storage.core import REFRESH_TOKENS, REVOCATIONS, at

#: Login: a Core INSERT (the ORM's unit of work cost more than everything else but argon2).
_INSERT_REFRESH_TOKEN = insert(REFRESH_TOKENS)
_USE_REFRESH_TOKEN = (
    update(REFRESH_TOKENS)
    .where(
        REFRESH_TOKENS.c.jti == bindparam("token"),
        REFRESH_TOKENS.c.user_id == bindparam("user"),
        REFRESH_TOKENS.c.used_time.is_(None),
        REFRESH_TOKENS.c.revoke_time.is_(None),
        REFRESH_TOKENS.c.expire_time > at("now"),
    )
    .values(used_time=at("now"))
)
_REFRESH_TOKEN = select(
    REFRESH_TOKENS.c.jti,
    REFRESH_TOKENS.c.session_id,
    REFRESH_TOKENS.c.user_id,
    REFRESH_TOKENS.c.expire_time,
    REFRESH_TOKENS.c.used_time,
    REFRESH_TOKENS.c.revoke_time,
).where(REFRESH_TOKENS.c.jti == bindparam("token"))
_REVOKE_SESSION = (
    update(REFRESH_TOKENS)
    .where(REFRESH_TOKENS.c.session_id == bindparam("session"), REFRESH_TOKENS.c.revoke_time.is_(None))
    .values(revoke_time=at("now"))
)
#: Every authenticated call when the revocation cache cannot answer.
_ANY_REVOKED = select(
    exists().where(
        REVOCATIONS.c.key.in_(bindparam("keys", expanding=True)),
        REVOCATIONS.c.expire_time > at("now"),
    )
)
_LIVE_REVOCATIONS = select(REVOCATIONS.c.key, REVOCATIONS.c.expire_time).where(
    REVOCATIONS.c.expire_time > at("now")
)


def _upsert_revocation(statement: sqlite.Insert | postgresql.Insert) -> sqlite.Insert | postgresql.Insert:
    """Insert a revocation, or extend an existing one to the later expiry (one statement, so
    concurrent revocations of one key cannot conflict)."""
    return statement.on_conflict_do_update(
        index_elements=[REVOCATIONS.c.key],
        set_={"expire_time": statement.excluded.expire_time},
        where=REVOCATIONS.c.expire_time < statement.excluded.expire_time,
    )


#: Both dialects spell the upsert ``INSERT .. ON CONFLICT (key) DO UPDATE .. WHERE``.
_ADD_REVOCATION = {
    "sqlite": _upsert_revocation(sqlite.insert(REVOCATIONS)),
    "postgresql": _upsert_revocation(postgresql.insert(REVOCATIONS)),
}


class SqlSessions:
    """The ``Sessions`` port."""

    __slots__ = ("_conn", "_dialect")

    def __init__(self, conn: AsyncConnection, dialect: str) -> None:
        self._conn = conn
        self._dialect = dialect

    async def add_refresh_token(
        self, *, jti: str, session_id: str, user_id: int, now: datetime, expire_time: datetime
    ) -> None:
        await self._conn.execute(
            _INSERT_REFRESH_TOKEN,
            {
                "jti": jti,
                "session_id": session_id,
                "user_id": user_id,
                "create_time": now,
                "expire_time": expire_time,
            },
        )

    async def use_refresh_token(self, jti: str, user_id: int, now: datetime) -> bool:
        result = await self._conn.execute(_USE_REFRESH_TOKEN, {"token": jti, "user": user_id, "now": now})
        return result.rowcount > 0

    async def refresh_token(self, jti: str) -> RefreshTokenRecord | None:
        row = (await self._conn.execute(_REFRESH_TOKEN, {"token": jti})).one_or_none()
        if row is None:
            return None
        jti_, session_id, user_id, expire_time, used_time, revoke_time = row
        return RefreshTokenRecord(
            jti=jti_,
            session_id=session_id,
            user_id=user_id,
            expire_time=expire_time,
            used_time=used_time,
            revoke_time=revoke_time,
        )

    async def revoke_session(self, session_id: str, now: datetime) -> None:
        await self._conn.execute(_REVOKE_SESSION, {"session": session_id, "now": now})

    async def add_revocations(self, entries: Sequence[tuple[str, datetime]]) -> None:
        latest: dict[str, datetime] = {}
        for key, expire_time in entries:
            if key not in latest or latest[key] < expire_time:
                latest[key] = expire_time
        if latest:
            await self._conn.execute(
                _ADD_REVOCATION[self._dialect],
                [{"key": key, "expire_time": expire_time} for key, expire_time in latest.items()],
            )

    async def any_revoked(self, keys: Sequence[str], now: datetime) -> bool:
        result = await self._conn.execute(_ANY_REVOKED, {"keys": list(keys), "now": now})
        return bool(result.scalar())

    async def live_revocations(self, now: datetime) -> list[tuple[str, datetime]]:
        result = await self._conn.execute(_LIVE_REVOCATIONS, {"now": now})
        return [(key, expire_time) for key, expire_time in result]
