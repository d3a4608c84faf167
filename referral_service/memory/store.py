"""``MemoryStore``: the ``Store`` port in the process, a twin of the SQL store.

It keeps the SQL schema's invariants and answers like today's queries do: the same unique
constraints (raising ``Conflict`` with the same names), the same "live code" rule, the same
compare-and-set updates. Transactions are serialised (one writer at a time, like SQLite) and
run on a copy-on-write view of the committed rows: rows are immutable, a write puts a new row
in the transaction's change set, and the change set is copied in when the work returns
(nothing of it is kept when the work raises or is cancelled). A transaction costs the rows it
touches, not the size of the store. ``read()`` reads the committed rows.

Writes belong in ``transact()``: a unit of work from ``read()`` refuses them (they could be
overwritten by a concurrent transaction), and so does a unit of work after its transaction
ended.

Times must be timezone-aware (naive ones are refused, as the database refuses them) and come
back in UTC. Ids are increasing integers; like a database sequence, a rolled-back transaction
does not give its ids back. Violations of foreign keys and check constraints, which only a
programming error can cause, raise ``ValueError``.

Two hooks for tests: ``down`` makes the store unreachable (``Unavailable``, ``ping()`` False),
and ``set_active`` disables an account.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from referral_service.domain import ports
from referral_service.domain.errors import Reason, Unavailable
from referral_service.domain.models import (
    ClientInfo,
    CodeState,
    EmailStatus,
    Event,
    EventDraft,
    Profile,
    ProfileState,
    Referral,
    ReferralCode,
    ServiceAccount,
    User,
)
from referral_service.domain.ports import Conflict

T = TypeVar("T")
_NO_CLIENT = ClientInfo()
K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

#: Longest stored error text (``user_profiles.last_error``).
_ERROR_MAX = 200


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("naive datetime given to the store")
    return value.astimezone(UTC)


# --- rows (immutable; an update replaces the row) ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _UserRow:
    id: int
    email: str
    email_key: str
    password_hash: str
    is_active: bool
    is_verified: bool
    is_superuser: bool
    referrer_id: int | None
    referral_code_id: int | None
    referral_count: int
    create_time: datetime
    update_time: datetime
    email_verification: str | None
    email_verify_time: datetime | None


@dataclass(frozen=True, slots=True)
class _CodeRow:
    id: int
    code: str
    #: None once the owner issued the code again (the newer code holds the key).
    code_key: str | None
    owner_id: int
    create_time: datetime
    expire_time: datetime
    revoke_time: datetime | None
    #: Set when the code stops occupying its owner's single open slot.
    close_time: datetime | None
    max_uses: int
    use_count: int


@dataclass(frozen=True, slots=True)
class _RequestRow:
    fingerprint: str
    resource_id: int
    create_time: datetime
    expire_time: datetime


@dataclass(frozen=True, slots=True)
class _ProfileRow:
    user_id: int
    state: ProfileState
    attempts: int
    #: When a pending lookup is next due (or its current lease ends); None once finished.
    next_attempt_time: datetime | None
    create_time: datetime
    update_time: datetime
    full_name: str | None = None
    company: str | None = None
    title: str | None = None
    location: str | None = None
    avatar_uri: str | None = None
    source: str | None = None
    fetch_time: datetime | None = None
    last_error: str | None = None


# --- tables: committed rows plus one transaction's changes ---------------------------------------


class _Table(Generic[K, R]):
    """The committed rows of one table (or index) and, in a transaction, its changes to them
    (``None`` marks a deletion). Without a change set the table is read-only."""

    __slots__ = ("_changes", "_rows")

    def __init__(self, rows: dict[K, R], writable: bool) -> None:
        self._rows = rows
        self._changes: dict[K, R | None] | None = {} if writable else None

    def get(self, key: K) -> R | None:
        if self._changes is not None and key in self._changes:
            return self._changes[key]
        return self._rows.get(key)

    def put(self, key: K, row: R) -> None:
        self._writes()[key] = row

    def delete(self, key: K) -> None:
        self._writes()[key] = None

    def items(self) -> list[tuple[K, R]]:
        """Every row, as a list (safe to write to the table while going through it)."""
        changes = self._changes or {}
        rows = [(key, row) for key, row in self._rows.items() if key not in changes]
        rows += [(key, row) for key, row in changes.items() if row is not None]
        return rows

    def _writes(self) -> dict[K, R | None]:
        if self._changes is None:
            raise RuntimeError("writes need a transaction: use Store.transact(), not Store.read()")
        return self._changes

    def commit(self) -> None:
        for key, row in (self._changes or {}).items():
            if row is None:
                self._rows.pop(key, None)
            else:
                self._rows[key] = row

    def close(self) -> None:
        self._changes = None


@dataclass
class _Data:
    """The committed state: tables and the indexes the queries use."""

    users: dict[int, _UserRow] = field(default_factory=dict)
    user_ids_by_email_key: dict[str, int] = field(default_factory=dict)
    #: Referred user ids of each referrer, ascending (ids only grow, so new ones go last).
    referral_ids: dict[int, tuple[int, ...]] = field(default_factory=dict)
    codes: dict[int, _CodeRow] = field(default_factory=dict)
    code_ids_by_key: dict[str, int] = field(default_factory=dict)
    #: The one open code of each owner (the partial unique index ``uq_referral_codes_open_owner``).
    open_code_ids: dict[int, int] = field(default_factory=dict)
    sessions: dict[str, ports.SessionRecord] = field(default_factory=dict)
    #: Session ids of each user, in creation order.
    user_sessions: dict[int, tuple[str, ...]] = field(default_factory=dict)
    revocations: dict[str, datetime] = field(default_factory=dict)
    requests: dict[tuple[str, str], _RequestRow] = field(default_factory=dict)
    profiles: dict[int, _ProfileRow] = field(default_factory=dict)
    service_accounts: dict[int, ServiceAccount] = field(default_factory=dict)
    service_account_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    user_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    code_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    events: dict[int, Event] = field(default_factory=dict)
    event_cursors: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    #: "purged_through" -> every event up to it was purged.
    event_retention: dict[str, int] = field(default_factory=dict)


class _View:
    """What one unit of work sees: the committed rows, plus its own changes in a transaction."""

    def __init__(self, data: _Data, writable: bool) -> None:
        self.data = data
        self.users = _Table(data.users, writable)
        self.user_ids_by_email_key = _Table(data.user_ids_by_email_key, writable)
        self.referral_ids = _Table(data.referral_ids, writable)
        self.codes = _Table(data.codes, writable)
        self.code_ids_by_key = _Table(data.code_ids_by_key, writable)
        self.open_code_ids = _Table(data.open_code_ids, writable)
        self.sessions = _Table(data.sessions, writable)
        self.user_sessions = _Table(data.user_sessions, writable)
        self.revocations = _Table(data.revocations, writable)
        self.requests = _Table(data.requests, writable)
        self.profiles = _Table(data.profiles, writable)
        self.service_accounts = _Table(data.service_accounts, writable)
        self.events = _Table(data.events, writable)
        self.event_retention = _Table(data.event_retention, writable)

    def _tables(self) -> tuple[_Table[Any, Any], ...]:
        return (
            self.users,
            self.user_ids_by_email_key,
            self.referral_ids,
            self.codes,
            self.code_ids_by_key,
            self.open_code_ids,
            self.sessions,
            self.user_sessions,
            self.revocations,
            self.requests,
            self.profiles,
            self.service_accounts,
            self.events,
            self.event_retention,
        )

    def commit(self) -> None:
        # No await in here: other tasks see all of the transaction or none of it.
        for table in self._tables():
            table.commit()

    def close(self) -> None:
        for table in self._tables():
            table.close()


# --- models --------------------------------------------------------------------------------------


def _profile_model(row: _ProfileRow) -> Profile:
    return Profile(
        state=row.state,
        full_name=row.full_name,
        company=row.company,
        title=row.title,
        location=row.location,
        avatar_uri=row.avatar_uri,
        source=row.source,
        fetch_time=row.fetch_time,
    )


def _user_model(row: _UserRow, profile: _ProfileRow | None) -> User:
    return User(
        id=row.id,
        email=row.email,
        is_active=row.is_active,
        is_verified=row.is_verified,
        is_superuser=row.is_superuser,
        referrer_id=row.referrer_id,
        create_time=row.create_time,
        email_verification=(
            EmailStatus(row.email_verification) if row.email_verification is not None else None
        ),
        email_verify_time=row.email_verify_time,
        profile=_profile_model(profile) if profile is not None else None,
    )


def _code_model(row: _CodeRow) -> ReferralCode:
    return ReferralCode(
        id=row.id,
        code=row.code,
        owner_id=row.owner_id,
        create_time=row.create_time,
        expire_time=row.expire_time,
        revoke_time=row.revoke_time,
        max_uses=row.max_uses,
        use_count=row.use_count,
    )


# --- repositories --------------------------------------------------------------------------------


class _Users:
    def __init__(self, view: _View) -> None:
        self._v = view

    def _model(self, row: _UserRow) -> User:
        return _user_model(row, self._v.profiles.get(row.id))

    async def add(self, user: ports.NewUser, now: datetime) -> User:
        v = self._v
        if v.user_ids_by_email_key.get(user.email_key) is not None:
            raise Conflict(ports.EMAIL_TAKEN)
        if user.referrer_id is not None and v.users.get(user.referrer_id) is None:
            raise ValueError("foreign key: no such referrer")
        if user.referral_code_id is not None and v.codes.get(user.referral_code_id) is None:
            raise ValueError("foreign key: no such referral code")
        now = _utc(now)
        row = _UserRow(
            id=next(v.data.user_ids),
            email=user.email,
            email_key=user.email_key,
            password_hash=user.password_hash,
            is_active=True,
            is_verified=user.is_verified,
            is_superuser=user.is_superuser,
            referrer_id=user.referrer_id,
            referral_code_id=user.referral_code_id,
            referral_count=0,
            create_time=now,
            update_time=now,
            email_verification=user.email_verification,
            email_verify_time=_utc(user.email_verify_time) if user.email_verify_time else None,
        )
        v.users.put(row.id, row)
        v.user_ids_by_email_key.put(row.email_key, row.id)
        if row.referrer_id is not None:
            v.referral_ids.put(row.referrer_id, (v.referral_ids.get(row.referrer_id) or ()) + (row.id,))
        return self._model(row)

    async def get(self, user_id: int) -> User | None:
        row = self._v.users.get(user_id)
        return self._model(row) if row is not None else None

    def _by_email_key(self, email_key: str) -> _UserRow | None:
        user_id = self._v.user_ids_by_email_key.get(email_key)
        return self._v.users.get(user_id) if user_id is not None else None

    async def by_email_key(self, email_key: str) -> User | None:
        row = self._by_email_key(email_key)
        return self._model(row) if row is not None else None

    async def credentials(self, email_key: str) -> ports.Credentials | None:
        row = self._by_email_key(email_key)
        if row is None:
            return None
        return ports.Credentials(user_id=row.id, password_hash=row.password_hash, is_active=row.is_active)

    async def set_password_hash(self, user_id: int, password_hash: str, now: datetime) -> None:
        row = self._v.users.get(user_id)
        if row is not None:
            self._v.users.put(user_id, replace(row, password_hash=password_hash, update_time=_utc(now)))

    async def make_superuser(self, user_id: int, now: datetime) -> User | None:
        row = self._v.users.get(user_id)
        if row is None:
            return None
        row = replace(row, is_superuser=True, update_time=_utc(now))
        self._v.users.put(user_id, row)
        return self._model(row)

    async def count_referral(self, referrer_id: int) -> None:
        row = self._v.users.get(referrer_id)
        if row is not None:
            self._v.users.put(referrer_id, replace(row, referral_count=row.referral_count + 1))


def _live(row: _CodeRow, now: datetime) -> bool:
    """Open, and ACTIVE by the domain's own rule (unrevoked, unexpired, not used up)."""
    return row.close_time is None and _code_model(row).state(now) is CodeState.ACTIVE


class _Codes:
    def __init__(self, view: _View) -> None:
        self._v = view

    async def add(self, code: ports.NewCode, now: datetime) -> ReferralCode:
        v = self._v
        # A write that breaks both constraints names the code key (as SqlStore does).
        if v.code_ids_by_key.get(code.code_key) is not None:
            raise Conflict(ports.CODE_TAKEN)
        if v.open_code_ids.get(code.owner_id) is not None:
            raise Conflict(ports.OPEN_CODE_EXISTS)
        if v.users.get(code.owner_id) is None:
            raise ValueError("foreign key: no such owner")
        if code.max_uses < 0:
            raise ValueError("check constraint: max_uses >= 0")
        row = _CodeRow(
            id=next(v.data.code_ids),
            code=code.code,
            code_key=code.code_key,
            owner_id=code.owner_id,
            create_time=_utc(now),
            expire_time=_utc(code.expire_time),
            revoke_time=None,
            close_time=None,
            max_uses=code.max_uses,
            use_count=0,
        )
        v.codes.put(row.id, row)
        v.code_ids_by_key.put(code.code_key, row.id)
        v.open_code_ids.put(row.owner_id, row.id)
        return _code_model(row)

    async def get(self, code_id: int) -> ReferralCode | None:
        row = self._v.codes.get(code_id)
        return _code_model(row) if row is not None else None

    async def by_key(self, code_key: str) -> ReferralCode | None:
        code_id = self._v.code_ids_by_key.get(code_key)
        return await self.get(code_id) if code_id is not None else None

    def _open(self, owner_id: int) -> _CodeRow | None:
        code_id = self._v.open_code_ids.get(owner_id)
        return self._v.codes.get(code_id) if code_id is not None else None

    def _close(self, row: _CodeRow, now: datetime, *, revoke: bool) -> _CodeRow:
        row = replace(
            row, close_time=now, revoke_time=(row.revoke_time or now) if revoke else row.revoke_time
        )
        self._v.codes.put(row.id, row)
        self._v.open_code_ids.delete(row.owner_id)
        return row

    async def open_code(self, owner_id: int) -> ReferralCode | None:
        row = self._open(owner_id)
        return _code_model(row) if row is not None else None

    async def close_dead(self, owner_id: int, now: datetime) -> None:
        row = self._open(owner_id)
        if row is None:
            return
        now = _utc(now)
        if _code_model(row).state(now) in (CodeState.EXPIRED, CodeState.EXHAUSTED):
            self._close(row, now, revoke=False)

    async def revoke_open(self, owner_id: int, now: datetime) -> ReferralCode | None:
        row = self._open(owner_id)
        if row is None:
            return None
        return _code_model(self._close(row, _utc(now), revoke=True))

    async def reclaim(self, owner_id: int, code_key: str) -> bool:
        code_id = self._v.code_ids_by_key.get(code_key)
        row = self._v.codes.get(code_id) if code_id is not None else None
        if row is None or row.owner_id != owner_id or row.close_time is None:
            return False
        self._v.codes.put(row.id, replace(row, code_key=None))
        self._v.code_ids_by_key.delete(code_key)
        return True

    async def live_by_email_key(self, email_key: str, now: datetime) -> ReferralCode | None:
        owner_id = self._v.user_ids_by_email_key.get(email_key)
        row = self._open(owner_id) if owner_id is not None else None
        return _code_model(row) if row is not None and _live(row, now) else None

    async def claim_use(self, code_id: int, now: datetime) -> bool:
        # No await between the check and the write: atomic, like the one UPDATE it mirrors.
        row = self._v.codes.get(code_id)
        if row is None or not _live(row, now):
            return False
        self._v.codes.put(code_id, replace(row, use_count=row.use_count + 1))
        return True


class _Referrals:
    def __init__(self, view: _View) -> None:
        self._v = view

    async def page(self, referrer_id: int, after_id: int, limit: int) -> list[Referral]:
        v = self._v
        ids = v.referral_ids.get(referrer_id) or ()
        start = bisect.bisect_right(ids, after_id)
        page: list[Referral] = []
        for user_id in ids[start : start + max(limit, 0)]:
            user = v.users.get(user_id)
            assert user is not None
            code = v.codes.get(user.referral_code_id) if user.referral_code_id is not None else None
            page.append(
                Referral(
                    user_id=user.id,
                    email=user.email,
                    join_time=user.create_time,
                    code=code.code if code is not None else "",
                )
            )
        return page

    async def count(self, referrer_id: int) -> int | None:
        row = self._v.users.get(referrer_id)
        return row.referral_count if row is not None else None


class _Sessions:
    def __init__(self, view: _View) -> None:
        self._v = view

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
        v = self._v
        if v.sessions.get(session_id) is not None:
            raise ValueError("primary key: session id already exists")
        if v.users.get(user_id) is None:
            raise ValueError("foreign key: no such user")
        v.sessions.put(
            session_id,
            ports.SessionRecord(
                id=session_id,
                user_id=user_id,
                refresh_jti=refresh_jti,
                create_time=_utc(now),
                refresh_time=None,
                expire_time=_utc(expire_time),
                revoke_time=None,
                revoke_reason=None,
                client_address=client.address,
                user_agent=client.user_agent,
            ),
        )
        v.user_sessions.put(user_id, (*(v.user_sessions.get(user_id) or ()), session_id))

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
        record = self._v.sessions.get(session_id)
        if (
            record is None
            or record.user_id != user_id
            or record.refresh_jti != refresh_jti
            or not record.live(now)
        ):
            return False
        self._v.sessions.put(
            session_id,
            replace(
                record,
                refresh_jti=new_jti,
                refresh_time=_utc(now),
                expire_time=_utc(expire_time),
                client_address=client.address,
                user_agent=client.user_agent,
            ),
        )
        return True

    async def get(self, session_id: str) -> ports.SessionRecord | None:
        return self._v.sessions.get(session_id)

    async def revoke(self, session_ids: Sequence[str], now: datetime, reason: str) -> None:
        now = _utc(now)
        for session_id in session_ids:
            record = self._v.sessions.get(session_id)
            if record is not None and record.revoke_time is None:
                self._v.sessions.put(session_id, replace(record, revoke_time=now, revoke_reason=reason))

    async def live(self, user_id: int, now: datetime) -> list[ports.SessionRecord]:
        found = []
        for session_id in self._v.user_sessions.get(user_id) or ():
            record = self._v.sessions.get(session_id)
            if record is not None and record.live(now):
                found.append(record)
        return sorted(found, key=lambda record: (record.create_time, record.id))

    async def add_revocations(self, entries: Sequence[tuple[str, datetime]]) -> None:
        for key, expire_time in entries:
            expire_time = _utc(expire_time)
            existing = self._v.revocations.get(key)
            if existing is None or existing < expire_time:
                self._v.revocations.put(key, expire_time)

    async def any_revoked(self, keys: Sequence[str], now: datetime) -> bool:
        for key in keys:
            expire_time = self._v.revocations.get(key)
            if expire_time is not None and expire_time > now:
                return True
        return False

    async def live_revocations(self, now: datetime) -> list[tuple[str, datetime]]:
        return [(key, expire) for key, expire in self._v.revocations.items() if expire > now]


class _Requests:
    def __init__(self, view: _View) -> None:
        self._v = view

    async def get(self, scope: str, request_id: str, now: datetime) -> ports.RememberedRequest | None:
        row = self._v.requests.get((scope, request_id))
        if row is None or row.expire_time <= now:
            return None
        return ports.RememberedRequest(fingerprint=row.fingerprint, resource_id=row.resource_id)

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
        key = (scope, request_id)
        existing = self._v.requests.get(key)
        if existing is not None and existing.expire_time > now:
            raise Conflict(ports.REQUEST_ID_TAKEN)
        self._v.requests.put(
            key,
            _RequestRow(
                fingerprint=fingerprint,
                resource_id=resource_id,
                create_time=_utc(now),
                expire_time=_utc(expire_time),
            ),
        )


class _Profiles:
    def __init__(self, view: _View) -> None:
        self._v = view

    def _pending(self, user_id: int) -> _ProfileRow | None:
        row = self._v.profiles.get(user_id)
        return row if row is not None and row.state is ProfileState.PENDING else None

    async def add_job(self, user_id: int, now: datetime) -> Profile:
        v = self._v
        if v.profiles.get(user_id) is not None:
            raise ValueError("primary key: the user already has a profile")
        if v.users.get(user_id) is None:
            raise ValueError("foreign key: no such user")
        now = _utc(now)
        row = _ProfileRow(
            user_id=user_id,
            state=ProfileState.PENDING,
            attempts=0,
            next_attempt_time=now,
            create_time=now,
            update_time=now,
        )
        v.profiles.put(user_id, row)
        return _profile_model(row)

    def _pending_times(self) -> list[tuple[datetime, int]]:
        return [
            (row.next_attempt_time, user_id)
            for user_id, row in self._v.profiles.items()
            if row.state is ProfileState.PENDING and row.next_attempt_time is not None
        ]

    async def due(self, now: datetime, limit: int) -> list[int]:
        due = sorted(entry for entry in self._pending_times() if entry[0] <= now)
        return [user_id for _, user_id in due[: max(limit, 0)]]

    async def next_due_time(self, exclude: Sequence[int] = ()) -> datetime | None:
        skip = set(exclude)
        return min((time for time, user_id in self._pending_times() if user_id not in skip), default=None)

    async def claim(self, user_id: int, now: datetime, lease_until: datetime) -> ports.ProfileClaim | None:
        row = self._pending(user_id)
        if row is None or row.next_attempt_time is None or row.next_attempt_time > now:
            return None
        row = replace(
            row, next_attempt_time=_utc(lease_until), attempts=row.attempts + 1, update_time=_utc(now)
        )
        self._v.profiles.put(user_id, row)
        user = self._v.users.get(user_id)
        if user is None:
            return None
        return ports.ProfileClaim(email=user.email, attempts=row.attempts)

    async def finish(
        self,
        user_id: int,
        state: ProfileState,
        now: datetime,
        *,
        source: str,
        person: ports.PersonData | None = None,
        error: str = "",
    ) -> None:
        row = self._pending(user_id)
        if row is None:
            return
        now = _utc(now)
        row = replace(
            row,
            state=ProfileState(state),
            next_attempt_time=None,
            source=source,
            fetch_time=now,
            update_time=now,
            last_error=error[:_ERROR_MAX] or None,
        )
        if person is not None:
            row = replace(
                row,
                full_name=person.full_name,
                company=person.company,
                title=person.title,
                location=person.location,
                avatar_uri=person.avatar_uri,
            )
        self._v.profiles.put(user_id, row)

    async def reschedule(self, user_id: int, now: datetime, next_time: datetime, *, error: str) -> None:
        row = self._pending(user_id)
        if row is not None:
            self._v.profiles.put(
                user_id,
                replace(
                    row,
                    next_attempt_time=_utc(next_time),
                    last_error=error[:_ERROR_MAX] or None,
                    update_time=_utc(now),
                ),
            )

    async def release(self, user_ids: Sequence[int], now: datetime) -> None:
        now = _utc(now)
        for user_id in dict.fromkeys(user_ids):
            row = self._pending(user_id)
            if row is not None:
                self._v.profiles.put(
                    user_id,
                    replace(row, next_attempt_time=now, attempts=max(row.attempts - 1, 0), update_time=now),
                )


class _ServiceAccounts:
    def __init__(self, view: _View) -> None:
        self._v = view

    async def add(
        self, *, name: str, client_id: str, secret_hash: str, scopes: Sequence[str], now: datetime
    ) -> ServiceAccount:
        v = self._v
        for _, account in v.service_accounts.items():
            if account.name == name:
                raise ports.Conflict(ports.SERVICE_ACCOUNT_TAKEN)
            if account.client_id == client_id:
                raise ValueError("unique: client id already exists")
        account = ServiceAccount(
            id=next(v.data.service_account_ids),
            name=name,
            client_id=client_id,
            secret_hash=secret_hash,
            scopes=tuple(scopes),
            create_time=_utc(now),
        )
        v.service_accounts.put(account.id, account)
        return account

    async def by_client_id(self, client_id: str) -> ServiceAccount | None:
        return next(
            (a for a in [row for _, row in self._v.service_accounts.items()] if a.client_id == client_id),
            None,
        )

    async def by_name(self, name: str) -> ServiceAccount | None:
        return next((a for _, a in self._v.service_accounts.items() if a.name == name), None)

    async def all(self) -> list[ServiceAccount]:
        return sorted((a for _, a in self._v.service_accounts.items()), key=lambda account: account.name)

    async def revoke(self, account_id: int, now: datetime) -> None:
        account = self._v.service_accounts.get(account_id)
        if account is not None and account.revoke_time is None:
            self._v.service_accounts.put(account_id, replace(account, revoke_time=_utc(now)))


class _Events:
    def __init__(self, view: _View) -> None:
        self._v = view

    async def append(self, draft: EventDraft, now: datetime) -> None:
        cursor = next(self._v.data.event_cursors)
        self._v.events.put(cursor, Event(draft.id, cursor, draft.type, _utc(now), dict(draft.data)))

    async def after(
        self, cursor: int, types: Sequence[str], limit: int, upto: int | None = None
    ) -> list[Event]:
        found = sorted(
            (
                event
                for key, event in self._v.events.items()
                if key > cursor and (upto is None or key <= upto)
            ),
            key=lambda event: event.cursor,
        )
        return [event for event in found if not types or event.type in types][:limit]

    async def head(self) -> int:
        return max((key for key, _ in self._v.events.items()), default=0)

    async def purged_through(self) -> int:
        return self._v.event_retention.get("purged_through") or 0

    async def purge(self, before: datetime) -> int:
        head = await self.head()
        old = [key for key, event in self._v.events.items() if event.time < before and key < head]
        if not old:
            return 0
        last = max(old)
        doomed = [key for key, _ in self._v.events.items() if key <= last]
        for key in doomed:
            self._v.events.delete(key)
        self._v.event_retention.put("purged_through", max(last, await self.purged_through()))
        return len(doomed)


class MemoryUnitOfWork:
    """The six repositories over one view (a transaction's, or the committed rows for reads)."""

    def __init__(self, view: _View) -> None:
        self._view = view
        self.users = _Users(view)
        self.codes = _Codes(view)
        self.referrals = _Referrals(view)
        self.sessions = _Sessions(view)
        self.requests = _Requests(view)
        self.profiles = _Profiles(view)
        self.service_accounts = _ServiceAccounts(view)
        self.events = _Events(view)

    async def purge_expired(self, now: datetime) -> int:
        v = self._view
        deleted = 0
        for key, expire_time in v.revocations.items():
            if expire_time <= now:
                v.revocations.delete(key)
                deleted += 1
        for request_key, request in v.requests.items():
            if request.expire_time <= now:
                v.requests.delete(request_key)
                deleted += 1
        for session_id, session in v.sessions.items():
            if session.expire_time <= now:
                v.sessions.delete(session_id)
                left = tuple(i for i in v.user_sessions.get(session.user_id) or () if i != session_id)
                if left:
                    v.user_sessions.put(session.user_id, left)
                else:
                    v.user_sessions.delete(session.user_id)
                deleted += 1
        return deleted


class MemoryStore:
    """The ``Store`` port in the process: one writer at a time, reads of committed rows."""

    def __init__(self) -> None:
        self._data = _Data()
        self._writer = asyncio.Lock()
        #: Set to make the store behave as if it could not be reached (outage tests).
        self.down = False

    def _check_up(self) -> None:
        if self.down:
            raise Unavailable(
                Reason.SERVICE_UNAVAILABLE,
                "the database is unavailable; retry shortly",
                retry_after_seconds=1.0,
            )

    @asynccontextmanager
    async def read(self) -> AsyncIterator[MemoryUnitOfWork]:
        self._check_up()
        view = _View(self._data, writable=False)
        yield MemoryUnitOfWork(view)

    async def transact(self, work: Callable[[ports.UnitOfWork], Awaitable[T]]) -> T:
        self._check_up()
        async with self._writer:
            view = _View(self._data, writable=True)
            try:
                result = await work(MemoryUnitOfWork(view))
                # A cancellation or an error above leaves the change set behind, uncommitted.
                self._check_up()
                view.commit()
            finally:
                view.close()
            return result

    async def ping(self) -> bool:
        return not self.down

    def set_active(self, user_id: int, active: bool) -> None:
        """Disable (or enable again) an account, as an operator would in the database: no use
        case does it yet. For tests."""
        row = self._data.users.get(user_id)
        if row is None:
            raise KeyError(user_id)
        self._data.users[user_id] = replace(row, is_active=active)


if TYPE_CHECKING:
    _conforms: ports.Store = MemoryStore()
