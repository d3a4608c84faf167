"""Login sessions, one row each (its current refresh token and its revoked state), and the
durable revocation records (``jti:<id>`` for an access token, ``sid:<id>`` for a session), kept
until they expire. Redis or the in-process copy serve the hot revocation check; this table
survives their restarts and answers when they cannot.

A refresh and a revocation of one session are each a single ``UPDATE`` of its row: on
PostgreSQL the second waits for the first's row lock and re-checks its ``WHERE`` against the
committed row (READ COMMITTED), so a refresh can never slip past a revocation; on SQLite the
one writer serialises them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, exists, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain.models import ClientInfo
from referral_service.domain.ports import SessionRecord
from referral_service.storage.core import REVOCATIONS, SESSIONS, at

_S = SESSIONS.c
#: Login: a Core INSERT (the ORM's unit of work cost more than everything else but argon2).
_ADD = insert(SESSIONS)
_ROTATE = (
    update(SESSIONS)
    .where(
        _S.id == bindparam("session"),
        _S.user_id == bindparam("user"),
        _S.refresh_jti == bindparam("token"),
        _S.revoke_time.is_(None),
        _S.expire_time > at("now"),
    )
    .values(
        refresh_jti=bindparam("new_token"),
        refresh_time=at("now"),
        expire_time=at("expire"),
        client_address=bindparam("client_address"),
        user_agent=bindparam("user_agent"),
    )
)
_COLUMNS = (
    _S.id,
    _S.user_id,
    _S.refresh_jti,
    _S.create_time,
    _S.refresh_time,
    _S.expire_time,
    _S.revoke_time,
    _S.revoke_reason,
    _S.client_address,
    _S.user_agent,
)
_GET = select(*_COLUMNS).where(_S.id == bindparam("session"))
_LIVE = (
    select(*_COLUMNS)
    .where(_S.user_id == bindparam("user"), _S.revoke_time.is_(None), _S.expire_time > at("now"))
    .order_by(_S.create_time, _S.id)
)
_REVOKE = (
    update(SESSIONS)
    .where(_S.id.in_(bindparam("sessions", expanding=True)), _S.revoke_time.is_(None))
    .values(revoke_time=at("now"), revoke_reason=bindparam("reason"))
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


_NO_CLIENT = ClientInfo()


def _record(row: Any) -> SessionRecord:
    id_, user_id, jti, create_time, refresh_time, expire_time, revoke_time, reason, address, agent = row
    return SessionRecord(
        id=id_,
        user_id=user_id,
        refresh_jti=jti,
        create_time=create_time,
        refresh_time=refresh_time,
        expire_time=expire_time,
        revoke_time=revoke_time,
        revoke_reason=reason,
        client_address=address or "",
        user_agent=agent or "",
    )


class SqlSessions:
    """The ``Sessions`` port."""

    __slots__ = ("_conn", "_dialect")

    def __init__(self, conn: AsyncConnection, dialect: str) -> None:
        self._conn = conn
        self._dialect = dialect

    async def add(
        self,
        *,
        session_id: str,
        user_id: int,
        refresh_jti: str,
        now: datetime,
        expire_time: datetime,
        client: ClientInfo = _NO_CLIENT,
    ) -> None:
        await self._conn.execute(
            _ADD,
            {
                "id": session_id,
                "user_id": user_id,
                "refresh_jti": refresh_jti,
                "create_time": now,
                "expire_time": expire_time,
                "client_address": client.address or None,
                "user_agent": client.user_agent or None,
            },
        )

    async def rotate(
        self,
        *,
        session_id: str,
        user_id: int,
        refresh_jti: str,
        new_jti: str,
        now: datetime,
        expire_time: datetime,
        client: ClientInfo = _NO_CLIENT,
    ) -> bool:
        result = await self._conn.execute(
            _ROTATE,
            {
                "session": session_id,
                "user": user_id,
                "token": refresh_jti,
                "new_token": new_jti,
                "now": now,
                "expire": expire_time,
                "client_address": client.address or None,
                "user_agent": client.user_agent or None,
            },
        )
        return result.rowcount > 0

    async def get(self, session_id: str) -> SessionRecord | None:
        row = (await self._conn.execute(_GET, {"session": session_id})).one_or_none()
        return None if row is None else _record(row)

    async def revoke(self, session_ids: Sequence[str], now: datetime, reason: str) -> None:
        if session_ids:
            await self._conn.execute(_REVOKE, {"sessions": list(session_ids), "now": now, "reason": reason})

    async def live(self, user_id: int, now: datetime) -> list[SessionRecord]:
        result = await self._conn.execute(_LIVE, {"user": user_id, "now": now})
        return [_record(row) for row in result]

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
