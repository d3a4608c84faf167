"""Email tokens (``email_tokens``) and the mail queue (``mail_outbox``).

The queue follows the enrichment jobs' scheme: a pending row's ``next_attempt_time`` is both
when it is due and, once claimed, the lease of the worker sending it (an atomic
compare-and-set, so two processes never send the same message at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import bindparam, case, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from referral_service.domain.ports import EmailToken, MailClaim
from referral_service.storage.core import EMAIL_TOKENS, MAILS, at, write

_PENDING = "pending"
_T = EMAIL_TOKENS.c
_M = MAILS.c

_TOKEN_COLUMNS = (_T.id, _T.user_id, _T.purpose, _T.code_hash, _T.code_failures, _T.expire_time, _T.use_time)
_TOKEN_BY_HASH = select(*_TOKEN_COLUMNS).where(_T.token_hash == bindparam("hash"))
_TOKENS_WITH_CODES = select(*_TOKEN_COLUMNS).where(
    _T.user_id == bindparam("user_id"),
    _T.purpose == bindparam("purpose"),
    _T.use_time.is_(None),
    _T.expire_time > at("now"),
    _T.code_hash.is_not(None),
)
_USE = (
    update(EMAIL_TOKENS)
    .where(_T.id == bindparam("token_id"), _T.use_time.is_(None), _T.expire_time > at("now"))
    .values(use_time=at("now"))
)
_USE_ALL = (
    update(EMAIL_TOKENS)
    .where(_T.user_id == bindparam("uid"), _T.purpose == bindparam("kind"), _T.use_time.is_(None))
    .values(use_time=at("now"))
)
_CODE_FAILURE = (
    update(EMAIL_TOKENS)
    .where(_T.id.in_(bindparam("ids", expanding=True)))
    .values(code_failures=_T.code_failures + 1)
)

_DUE = (
    select(_M.id)
    .where(_M.state == _PENDING, _M.next_attempt_time <= at("now"))
    .order_by(_M.next_attempt_time, _M.id)
    .limit(bindparam("limit"))
)
_NEXT_DUE_TIME = select(func.min(_M.next_attempt_time)).where(
    _M.state == _PENDING, _M.id.not_in(bindparam("exclude", expanding=True))
)
_CLAIM = (
    update(MAILS)
    .where(_M.id == bindparam("mail_id"), _M.state == _PENDING, _M.next_attempt_time <= at("now"))
    .values(next_attempt_time=at("lease_until"), attempts=_M.attempts + 1, update_time=at("now"))
    .returning(_M.id, _M.kind, _M.user_id, _M.email_key, _M.message_id, _M.attempts)
)
_RESCHEDULE = (
    update(MAILS)
    .where(_M.id == bindparam("mail_id"), _M.state == _PENDING)
    .values(next_attempt_time=at("next_time"), last_error=bindparam("error"), update_time=at("now"))
)
_RELEASE = (
    update(MAILS)
    .where(_M.id.in_(bindparam("ids", expanding=True)), _M.state == _PENDING)
    .values(
        next_attempt_time=at("now"),
        attempts=case((_M.attempts > 0, _M.attempts - 1), else_=0),
        update_time=at("now"),
    )
)


def _token(row: Sequence[object]) -> EmailToken:
    token_id, user_id, purpose, code_hash, failures, expire_time, use_time = row
    assert isinstance(expire_time, datetime)
    assert use_time is None or isinstance(use_time, datetime)
    return EmailToken(
        id=int(token_id),  # type: ignore[call-overload]
        user_id=int(user_id),  # type: ignore[call-overload]
        purpose=str(purpose),
        code_hash=None if code_hash is None else str(code_hash),
        code_failures=int(failures),  # type: ignore[call-overload]
        expire_time=expire_time,
        use_time=use_time,
    )


def _error(text: str) -> str | None:
    return text[:200] or None


class SqlEmailTokens:
    """The ``EmailTokens`` port."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def add(
        self,
        *,
        user_id: int,
        purpose: str,
        token_hash: str,
        code_hash: str | None,
        now: datetime,
        expire_time: datetime,
    ) -> None:
        await write(
            self._conn,
            insert(EMAIL_TOKENS),
            {
                "user_id": user_id,
                "purpose": purpose,
                "token_hash": token_hash,
                "code_hash": code_hash,
                "code_failures": 0,
                "create_time": now,
                "expire_time": expire_time,
                "use_time": None,
            },
        )

    async def by_hash(self, token_hash: str) -> EmailToken | None:
        row = (await self._conn.execute(_TOKEN_BY_HASH, {"hash": token_hash})).one_or_none()
        return None if row is None else _token(row)

    async def with_codes(self, user_id: int, purpose: str, now: datetime) -> list[EmailToken]:
        rows = await self._conn.execute(
            _TOKENS_WITH_CODES, {"user_id": user_id, "purpose": purpose, "now": now}
        )
        return [_token(row) for row in rows]

    async def use(self, token_id: int, now: datetime) -> bool:
        result = await self._conn.execute(_USE, {"token_id": token_id, "now": now})
        return result.rowcount == 1

    async def use_all(self, user_id: int, purpose: str, now: datetime) -> None:
        await self._conn.execute(_USE_ALL, {"uid": user_id, "kind": purpose, "now": now})

    async def count_code_failure(self, token_ids: Sequence[int]) -> None:
        if token_ids:
            await self._conn.execute(_CODE_FAILURE, {"ids": list(token_ids)})

    async def discard(self, token_hash: str) -> None:
        await self._conn.execute(EMAIL_TOKENS.delete().where(_T.token_hash == token_hash))


class SqlMails:
    """The ``Mails`` port."""

    __slots__ = ("_conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def enqueue(
        self, kind: str, *, email_key: str, message_id: str, now: datetime, user_id: int | None = None
    ) -> None:
        await write(
            self._conn,
            insert(MAILS),
            {
                "kind": kind,
                "user_id": user_id,
                "email_key": email_key,
                "state": _PENDING,
                "message_id": message_id,
                "attempts": 0,
                "next_attempt_time": now,
                "create_time": now,
                "update_time": now,
            },
        )

    async def due(self, now: datetime, limit: int) -> list[int]:
        result = await self._conn.execute(_DUE, {"now": now, "limit": limit})
        return [int(mail_id) for mail_id in result.scalars()]

    async def next_due_time(self, exclude: Sequence[int] = ()) -> datetime | None:
        value: datetime | None = (
            await self._conn.execute(_NEXT_DUE_TIME, {"exclude": list(exclude)})
        ).scalar()
        return value

    async def claim(self, mail_id: int, now: datetime, lease_until: datetime) -> MailClaim | None:
        row = (
            await self._conn.execute(_CLAIM, {"mail_id": mail_id, "now": now, "lease_until": lease_until})
        ).one_or_none()
        if row is None:
            return None
        claimed_id, kind, user_id, email_key, message_id, attempts = row
        return MailClaim(
            id=int(claimed_id),
            kind=kind,
            user_id=None if user_id is None else int(user_id),
            email_key=email_key,
            message_id=message_id,
            attempts=int(attempts),
        )

    async def finish(self, mail_id: int, state: str, now: datetime, *, error: str = "") -> None:
        await self._conn.execute(
            update(MAILS)
            .where(_M.id == mail_id, _M.state == _PENDING)
            .values(
                state=state,
                next_attempt_time=None,
                last_error=_error(error),
                update_time=now,
                send_time=now if state == "sent" else None,
            )
        )

    async def reschedule(self, mail_id: int, now: datetime, next_time: datetime, *, error: str) -> None:
        await self._conn.execute(
            _RESCHEDULE, {"mail_id": mail_id, "now": now, "next_time": next_time, "error": _error(error)}
        )

    async def release(self, mail_ids: Sequence[int], now: datetime) -> None:
        if mail_ids:
            await self._conn.execute(_RELEASE, {"ids": list(mail_ids), "now": now})
