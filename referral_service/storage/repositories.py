"""Queries. Each function runs inside the caller's session (one transaction per use case) and
lets the database enforce the invariants: unique-violations come back as ``Conflict`` naming the
constraint, so use cases never check-then-insert."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Row, and_, bindparam, case, delete, exists, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from referral_service.domain import models
from referral_service.storage.tables import (
    IdempotencyRow,
    ReferralCodeRow,
    RefreshTokenRow,
    RevocationRow,
    UserProfileRow,
    UserRow,
)

if TYPE_CHECKING:
    from referral_service.domain.enrichment import PersonData


class Conflict(Exception):
    """A unique constraint refused a write; ``constraint`` names which one."""

    def __init__(self, constraint: str) -> None:
        super().__init__(constraint)
        self.constraint = constraint


#: Constraint names and the text each backend puts in its error message for them.
_CONSTRAINTS = {
    "uq_users_email_key": ("uq_users_email_key", "users.email_key"),
    "uq_referral_codes_code_key": ("uq_referral_codes_code_key", "referral_codes.code_key"),
    "uq_referral_codes_open_owner": ("uq_referral_codes_open_owner", "referral_codes.owner_id"),
    "pk_idempotency_keys": ("pk_idempotency_keys", "idempotency_keys.scope"),
    "pk_revocations": ("pk_revocations", "revocations.key"),
}


def _conflict(error: IntegrityError) -> Conflict | None:
    text = str(error.orig)
    for name, needles in _CONSTRAINTS.items():
        if any(needle in text for needle in needles):
            return Conflict(name)
    return None


#: Core-only statements (columns, not ORM rows) run on a session or on a bare connection
#: (``Database.reader()`` / ``writer()``, the cheaper path for hot reads and login).
Executor = AsyncSession | AsyncConnection


async def flush(session: AsyncSession) -> None:
    try:
        await session.flush()
    except IntegrityError as error:
        conflict = _conflict(error)
        if conflict is None:
            raise
        raise conflict from error


def profile_model(row: UserProfileRow) -> models.Profile:
    return models.Profile(
        state=models.ProfileState(row.state),
        full_name=row.full_name,
        company=row.company,
        title=row.title,
        location=row.location,
        avatar_uri=row.avatar_uri,
        source=row.source,
        fetch_time=row.fetch_time,
    )


def user_model(row: UserRow, profile: UserProfileRow | None = None) -> models.User:
    return models.User(
        id=row.id,
        email=row.email,
        is_active=row.is_active,
        is_verified=row.is_verified,
        is_superuser=row.is_superuser,
        referrer_id=row.referrer_id,
        create_time=row.create_time,
        email_verification=(
            models.EmailStatus(row.email_verification) if row.email_verification is not None else None
        ),
        email_verify_time=row.email_verify_time,
        profile=profile_model(profile) if profile is not None else None,
    )


def code_model(row: ReferralCodeRow) -> models.ReferralCode:
    return models.ReferralCode(
        id=row.id,
        code=row.code,
        owner_id=row.owner_id,
        create_time=row.create_time,
        expire_time=row.expire_time,
        revoke_time=row.revoke_time,
        max_uses=row.max_uses,
        use_count=row.use_count,
    )


# --- users -----------------------------------------------------------------------------------


async def add_user(
    session: AsyncSession,
    *,
    email: str,
    email_key: str,
    password_hash: str,
    now: datetime,
    is_superuser: bool = False,
    referrer_id: int | None = None,
    referral_code_id: int | None = None,
    is_verified: bool = False,
    email_verification: str | None = None,
    email_verify_time: datetime | None = None,
) -> UserRow:
    row = UserRow(
        email=email,
        email_key=email_key,
        password_hash=password_hash,
        is_active=True,
        is_verified=is_verified,
        is_superuser=is_superuser,
        referrer_id=referrer_id,
        referral_code_id=referral_code_id,
        referral_count=0,
        create_time=now,
        update_time=now,
        email_verification=email_verification,
        email_verify_time=email_verify_time,
    )
    session.add(row)
    await flush(session)
    return row


async def user_by_id(session: AsyncSession, user_id: int) -> UserRow | None:
    return await session.get(UserRow, user_id)


async def user_by_email_key(session: AsyncSession, email_key: str) -> UserRow | None:
    result = await session.execute(select(UserRow).where(UserRow.email_key == email_key))
    return result.scalar_one_or_none()


# Statements of the hottest paths are built once, with bind parameters: building a statement
# and its cache key costs more event-loop time than SQLite takes to run it.
_LOGIN_CREDENTIALS = select(UserRow.id, UserRow.password_hash, UserRow.is_active).where(
    UserRow.email_key == bindparam("email_key")
)
_INSERT_REFRESH_TOKEN = insert(RefreshTokenRow)
_ANY_REVOKED = select(
    exists().where(
        RevocationRow.key.in_(bindparam("keys", expanding=True)),
        RevocationRow.expire_time > bindparam("now"),
    )
)

_REFERRAL_PAGE = (
    select(UserRow.id, UserRow.email, UserRow.create_time, ReferralCodeRow.code)
    .outerjoin(ReferralCodeRow, ReferralCodeRow.id == UserRow.referral_code_id)
    .where(UserRow.referrer_id == bindparam("referrer_id"), UserRow.id > bindparam("after_id"))
    .order_by(UserRow.id)
    .limit(bindparam("limit"))
)
_REFERRAL_COUNT = select(UserRow.referral_count).where(UserRow.id == bindparam("user_id"))


async def login_credentials(conn: Executor, email_key: str) -> Row[int, str, bool] | None:
    """(id, password_hash, is_active) of the account with this email, for a login."""
    result = await conn.execute(_LOGIN_CREDENTIALS, {"email_key": email_key})
    return result.one_or_none()


async def set_password_hash(session: Executor, user_id: int, password_hash: str, now: datetime) -> None:
    await session.execute(
        update(UserRow).where(UserRow.id == user_id).values(password_hash=password_hash, update_time=now)
    )


async def count_referral(session: AsyncSession, referrer_id: int) -> None:
    await session.execute(
        update(UserRow).where(UserRow.id == referrer_id).values(referral_count=UserRow.referral_count + 1)
    )


async def make_superuser(session: AsyncSession, user_id: int, now: datetime) -> None:
    await session.execute(
        update(UserRow).where(UserRow.id == user_id).values(is_superuser=True, update_time=now)
    )


# --- refresh tokens and revocations ------------------------------------------------------------


async def add_refresh_token(
    session: Executor,
    *,
    jti: str,
    session_id: str,
    user_id: int,
    now: datetime,
    expire_time: datetime,
) -> None:
    # A Core INSERT, not session.add() + flush(): on the login path the ORM's unit of work cost
    # more event-loop time than everything else but argon2.
    await session.execute(
        _INSERT_REFRESH_TOKEN,
        {
            "jti": jti,
            "session_id": session_id,
            "user_id": user_id,
            "create_time": now,
            "expire_time": expire_time,
        },
    )


async def use_refresh_token(session: AsyncSession, jti: str, user_id: int, now: datetime) -> bool:
    """Atomically mark an unused, unrevoked, unexpired refresh token as used. Exactly one of
    any number of concurrent callers gets True."""
    result = await session.execute(
        update(RefreshTokenRow)
        .where(
            RefreshTokenRow.jti == jti,
            RefreshTokenRow.user_id == user_id,
            RefreshTokenRow.used_time.is_(None),
            RefreshTokenRow.revoke_time.is_(None),
            RefreshTokenRow.expire_time > now,
        )
        .values(used_time=now)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def refresh_token(session: AsyncSession, jti: str) -> RefreshTokenRow | None:
    return await session.get(RefreshTokenRow, jti)


async def revoke_session(session: AsyncSession, session_id: str, now: datetime) -> None:
    await session.execute(
        update(RefreshTokenRow)
        .where(RefreshTokenRow.session_id == session_id, RefreshTokenRow.revoke_time.is_(None))
        .values(revoke_time=now)
    )


async def add_revocations(session: AsyncSession, entries: Sequence[tuple[str, datetime]]) -> None:
    for key, expire_time in entries:
        existing = await session.get(RevocationRow, key)
        if existing is None:
            session.add(RevocationRow(key=key, expire_time=expire_time))
        elif existing.expire_time < expire_time:
            existing.expire_time = expire_time
    await session.flush()


async def any_revoked(session: Executor, keys: Sequence[str], now: datetime) -> bool:
    result = await session.execute(_ANY_REVOKED, {"keys": list(keys), "now": now})
    return bool(result.scalar())


async def live_revocations(session: AsyncSession, now: datetime) -> list[tuple[str, datetime]]:
    result = await session.execute(
        select(RevocationRow.key, RevocationRow.expire_time).where(RevocationRow.expire_time > now)
    )
    return [(key, expire) for key, expire in result.all()]


async def purge_expired(session: AsyncSession, now: datetime) -> int:
    """Delete what can no longer matter: revocations of tokens past their expiry, forgotten
    request ids, and refresh tokens past their expiry (reuse detection only needs live ones).
    Returns the number of rows deleted."""
    deleted = 0
    for table, column in (
        (RevocationRow, RevocationRow.expire_time),
        (IdempotencyRow, IdempotencyRow.expire_time),
        (RefreshTokenRow, RefreshTokenRow.expire_time),
    ):
        result = await session.execute(delete(table).where(column <= now))
        deleted += int(result.rowcount or 0)  # type: ignore[attr-defined]
    return deleted


# --- idempotency (AIP-155) -----------------------------------------------------------------------


async def idempotent_result(
    session: AsyncSession, scope: str, request_id: str, now: datetime
) -> IdempotencyRow | None:
    row = await session.get(IdempotencyRow, (scope, request_id))
    if row is None or row.expire_time <= now:
        return None
    return row


async def remember_request(
    session: AsyncSession,
    *,
    scope: str,
    request_id: str,
    fingerprint: str,
    resource_id: int,
    now: datetime,
    expire_time: datetime,
) -> None:
    await session.execute(
        delete(IdempotencyRow).where(
            IdempotencyRow.scope == scope,
            IdempotencyRow.request_id == request_id,
            IdempotencyRow.expire_time <= now,
        )
    )
    session.add(
        IdempotencyRow(
            scope=scope,
            request_id=request_id,
            fingerprint=fingerprint,
            resource_id=resource_id,
            create_time=now,
            expire_time=expire_time,
        )
    )
    await flush(session)


# --- referral codes --------------------------------------------------------------------------------


def _live(now: datetime) -> list[object]:
    return [
        ReferralCodeRow.close_time.is_(None),
        ReferralCodeRow.revoke_time.is_(None),
        ReferralCodeRow.expire_time > now,
        or_(ReferralCodeRow.max_uses == 0, ReferralCodeRow.use_count < ReferralCodeRow.max_uses),
    ]


async def close_dead_codes(session: AsyncSession, owner_id: int, now: datetime) -> None:
    """Free the owner's open slot if its code has expired or been used up."""
    await session.execute(
        update(ReferralCodeRow)
        .where(
            ReferralCodeRow.owner_id == owner_id,
            ReferralCodeRow.close_time.is_(None),
            or_(
                ReferralCodeRow.expire_time <= now,
                and_(
                    ReferralCodeRow.max_uses > 0,
                    ReferralCodeRow.use_count >= ReferralCodeRow.max_uses,
                ),
            ),
        )
        .values(close_time=now)
    )


async def add_code(
    session: AsyncSession,
    *,
    code: str,
    code_key: str,
    owner_id: int,
    now: datetime,
    expire_time: datetime,
    max_uses: int,
) -> ReferralCodeRow:
    row = ReferralCodeRow(
        code=code,
        code_key=code_key,
        owner_id=owner_id,
        create_time=now,
        expire_time=expire_time,
        max_uses=max_uses,
        use_count=0,
    )
    session.add(row)
    await flush(session)
    return row


async def open_code(session: AsyncSession, owner_id: int) -> ReferralCodeRow | None:
    result = await session.execute(
        select(ReferralCodeRow).where(
            ReferralCodeRow.owner_id == owner_id, ReferralCodeRow.close_time.is_(None)
        )
    )
    return result.scalar_one_or_none()


async def code_by_id(session: AsyncSession, code_id: int) -> ReferralCodeRow | None:
    return await session.get(ReferralCodeRow, code_id)


async def code_by_key(session: AsyncSession, code_key: str) -> ReferralCodeRow | None:
    result = await session.execute(select(ReferralCodeRow).where(ReferralCodeRow.code_key == code_key))
    return result.scalar_one_or_none()


async def live_code_by_email_key(
    session: AsyncSession, email_key: str, now: datetime
) -> ReferralCodeRow | None:
    result = await session.execute(
        select(ReferralCodeRow)
        .join(UserRow, UserRow.id == ReferralCodeRow.owner_id)
        .where(UserRow.email_key == email_key, *_live(now))  # type: ignore[arg-type]
    )
    return result.scalar_one_or_none()


async def revoke_open_code(session: AsyncSession, owner_id: int, now: datetime) -> ReferralCodeRow | None:
    row = await open_code(session, owner_id)
    if row is None:
        return None
    row.revoke_time = row.revoke_time or now
    row.close_time = now
    await session.flush()
    return row


async def claim_code_use(session: AsyncSession, code_id: int, now: datetime) -> bool:
    """Atomically count one use of a live code. Concurrent claims can never push use_count past
    max_uses: the condition and the increment are one statement (and a row lock on PostgreSQL)."""
    result = await session.execute(
        update(ReferralCodeRow)
        .where(ReferralCodeRow.id == code_id, *_live(now))  # type: ignore[arg-type]
        .values(use_count=ReferralCodeRow.use_count + 1)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


# --- referrals ---------------------------------------------------------------------------------------


async def referral_page(
    session: Executor, referrer_id: int, after_id: int, limit: int
) -> list[models.Referral]:
    """Keyset pagination on (referrer_id, id): the cost of a page does not depend on its depth."""
    result = await session.execute(
        _REFERRAL_PAGE, {"referrer_id": referrer_id, "after_id": after_id, "limit": limit}
    )
    return [
        models.Referral(user_id=uid, email=email, join_time=joined, code=code or "")
        for uid, email, joined, code in result.all()
    ]


async def referral_count(session: Executor, referrer_id: int) -> int | None:
    result = await session.execute(_REFERRAL_COUNT, {"user_id": referrer_id})
    value = result.scalar_one_or_none()
    return None if value is None else int(value)


async def count_users(session: AsyncSession) -> int:
    result = await session.execute(select(func.count()).select_from(UserRow))
    return int(result.scalar_one())


# --- profiles (enrichment jobs and results) ---------------------------------------------------


async def add_profile_job(session: AsyncSession, user_id: int, now: datetime) -> UserProfileRow:
    row = UserProfileRow(
        user_id=user_id,
        state=models.ProfileState.PENDING.value,
        attempts=0,
        next_attempt_time=now,
        create_time=now,
        update_time=now,
    )
    session.add(row)
    await flush(session)
    return row


async def profile(session: AsyncSession, user_id: int) -> UserProfileRow | None:
    return await session.get(UserProfileRow, user_id)


async def due_profile_jobs(session: AsyncSession, now: datetime, limit: int) -> list[int]:
    result = await session.execute(
        select(UserProfileRow.user_id)
        .where(
            UserProfileRow.state == models.ProfileState.PENDING.value,
            UserProfileRow.next_attempt_time <= now,
        )
        .order_by(UserProfileRow.next_attempt_time)
        .limit(limit)
    )
    return list(result.scalars())


async def next_profile_job_time(session: AsyncSession, exclude: Sequence[int] = ()) -> datetime | None:
    """When the earliest pending lookup (other than ``exclude``) is due."""
    query = select(func.min(UserProfileRow.next_attempt_time)).where(
        UserProfileRow.state == models.ProfileState.PENDING.value
    )
    if exclude:
        query = query.where(UserProfileRow.user_id.not_in(list(exclude)))
    return await session.scalar(query)


async def claim_profile_job(
    session: AsyncSession, user_id: int, now: datetime, lease_until: datetime
) -> tuple[str, int] | None:
    """Take the lease on a due lookup (compare-and-set on ``next_attempt_time``) and count the
    attempt. Returns the email to look up and the attempt number, or None when the job is not
    due (finished, or claimed by another worker)."""
    result = await session.execute(
        update(UserProfileRow)
        .where(
            UserProfileRow.user_id == user_id,
            UserProfileRow.state == models.ProfileState.PENDING.value,
            UserProfileRow.next_attempt_time <= now,
        )
        .values(
            next_attempt_time=lease_until,
            attempts=UserProfileRow.attempts + 1,
            update_time=now,
        )
        .returning(UserProfileRow.attempts)
    )
    attempts = result.scalar_one_or_none()
    if attempts is None:
        return None
    email = await session.scalar(select(UserRow.email).where(UserRow.id == user_id))
    if email is None:
        return None
    return email, attempts


async def finish_profile_job(
    session: AsyncSession,
    user_id: int,
    state: models.ProfileState,
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
        "last_error": error[:200] or None,
    }
    if person is not None:
        values.update(
            full_name=person.full_name,
            company=person.company,
            title=person.title,
            location=person.location,
            avatar_uri=person.avatar_uri,
        )
    await session.execute(
        update(UserProfileRow)
        .where(
            UserProfileRow.user_id == user_id,
            UserProfileRow.state == models.ProfileState.PENDING.value,
        )
        .values(**values)
    )


async def reschedule_profile_job(
    session: AsyncSession, user_id: int, now: datetime, next_time: datetime, *, error: str
) -> None:
    await session.execute(
        update(UserProfileRow)
        .where(
            UserProfileRow.user_id == user_id,
            UserProfileRow.state == models.ProfileState.PENDING.value,
        )
        .values(next_attempt_time=next_time, last_error=error[:200] or None, update_time=now)
    )


async def release_profile_jobs(session: AsyncSession, user_ids: Sequence[int], now: datetime) -> None:
    """Hand interrupted lookups back: due now, and the interrupted attempt does not count."""
    if not user_ids:
        return
    await session.execute(
        update(UserProfileRow)
        .where(
            UserProfileRow.user_id.in_(user_ids),
            UserProfileRow.state == models.ProfileState.PENDING.value,
        )
        .values(
            next_attempt_time=now,
            attempts=case((UserProfileRow.attempts > 0, UserProfileRow.attempts - 1), else_=0),
            update_time=now,
        )
    )
