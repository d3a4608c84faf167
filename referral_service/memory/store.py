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
    GRANT,
    ClientInfo,
    CodeState,
    Conversion,
    EmailStatus,
    Event,
    EventDraft,
    Profile,
    ProfileState,
    Referral,
    ReferralCode,
    ReferralState,
    ReferralStatus,
    ReviewState,
    Reward,
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
    verify_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class _TokenRow:
    token: ports.EmailToken
    token_hash: str


@dataclass(frozen=True, slots=True)
class _MailRow:
    id: int
    kind: str
    user_id: int | None
    email_key: str
    state: str
    message_id: str
    attempts: int
    next_attempt_time: datetime | None
    last_error: str | None
    update_time: datetime


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


@dataclass(frozen=True, slots=True)
class _EntryRow:
    id: int
    entry: ports.NewRewardEntry
    create_time: datetime


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
    email_tokens: dict[int, _TokenRow] = field(default_factory=dict)
    email_token_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    mails: dict[int, _MailRow] = field(default_factory=dict)
    mail_ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    #: The referral programme (issue 17): state rows, conversions (and their unique key), ledger
    #: entries (and the unique "one correction per grant"), counters.
    referral_states: dict[int, ReferralStatus] = field(default_factory=dict)
    conversions: dict[int, Conversion] = field(default_factory=dict)
    conversion_ids: dict[tuple[int, str], int] = field(default_factory=dict)
    entries: dict[int, _EntryRow] = field(default_factory=dict)
    corrections: dict[int, int] = field(default_factory=dict)
    counters: dict[tuple[int, str, str], int] = field(default_factory=dict)
    conversion_seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    entry_seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))
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
        self.email_tokens = _Table(data.email_tokens, writable)
        self.mails = _Table(data.mails, writable)
        self.referral_states = _Table(data.referral_states, writable)
        self.conversions = _Table(data.conversions, writable)
        self.conversion_ids = _Table(data.conversion_ids, writable)
        self.entries = _Table(data.entries, writable)
        self.corrections = _Table(data.corrections, writable)
        self.counters = _Table(data.counters, writable)
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
            self.email_tokens,
            self.mails,
            self.referral_states,
            self.conversions,
            self.conversion_ids,
            self.entries,
            self.corrections,
            self.counters,
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
        verify_time=row.verify_time,
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
            verify_time=now if user.is_verified else None,
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

    async def mark_verified(self, user_id: int, now: datetime) -> bool:
        row = self._v.users.get(user_id)
        if row is None or row.is_verified:
            return False
        now = _utc(now)
        self._v.users.put(user_id, replace(row, is_verified=True, verify_time=now, update_time=now))
        return True

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

    async def page(
        self, referrer_id: int, after_id: int, limit: int, state: ReferralState | None = None
    ) -> list[Referral]:
        v = self._v
        ids = v.referral_ids.get(referrer_id) or ()
        start = bisect.bisect_right(ids, after_id)
        page: list[Referral] = []
        for user_id in ids[start : start + max(limit, 0)]:
            user = v.users.get(user_id)
            assert user is not None
            code = v.codes.get(user.referral_code_id) if user.referral_code_id is not None else None
            status = v.referral_states.get(user.id)
            current = status.state if status is not None else ReferralState.PENDING
            if state is not None and current is not state:
                continue
            page.append(
                Referral(
                    user_id=user.id,
                    email=user.email,
                    join_time=user.create_time,
                    code=code.code if code is not None else "",
                    state=current,
                    review=status.review if status is not None else None,
                    qualify_time=status.qualify_time if status is not None else None,
                    reward_time=status.reward_time if status is not None else None,
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


class _Queue:
    """What the in-memory job queues share (enrichment lookups, the mail queue): a pending row's
    ``next_attempt_time`` is when it is due, or the end of the lease of the worker holding it."""

    def __init__(self, view: _View, rows: _Table[int, Any]) -> None:
        self._v = view
        self._rows = rows

    @staticmethod
    def _is_pending(row: Any) -> bool:
        raise NotImplementedError

    def _pending(self, job_id: int) -> Any:
        row = self._rows.get(job_id)
        return row if row is not None and self._is_pending(row) else None

    def _pending_times(self) -> list[tuple[datetime, int]]:
        return [
            (row.next_attempt_time, job_id)
            for job_id, row in self._rows.items()
            if self._is_pending(row) and row.next_attempt_time is not None
        ]

    async def due(self, now: datetime, limit: int) -> list[int]:
        due = sorted(entry for entry in self._pending_times() if entry[0] <= now)
        return [job_id for _, job_id in due[: max(limit, 0)]]

    async def next_due_time(self, exclude: Sequence[int] = ()) -> datetime | None:
        skip = set(exclude)
        return min((time for time, job_id in self._pending_times() if job_id not in skip), default=None)

    def _lease(self, job_id: int, now: datetime, lease_until: datetime) -> Any:
        """Claim a due job: its lease and one more attempt; None when it is not due."""
        row = self._pending(job_id)
        if row is None or row.next_attempt_time is None or row.next_attempt_time > now:
            return None
        row = replace(
            row, next_attempt_time=_utc(lease_until), attempts=row.attempts + 1, update_time=_utc(now)
        )
        self._rows.put(job_id, row)
        return row

    async def reschedule(self, job_id: int, now: datetime, next_time: datetime, *, error: str) -> None:
        row = self._pending(job_id)
        if row is not None:
            self._rows.put(
                job_id,
                replace(
                    row,
                    next_attempt_time=_utc(next_time),
                    last_error=error[:_ERROR_MAX] or None,
                    update_time=_utc(now),
                ),
            )

    async def release(self, job_ids: Sequence[int], now: datetime) -> None:
        now = _utc(now)
        for job_id in dict.fromkeys(job_ids):
            row = self._pending(job_id)
            if row is not None:
                self._rows.put(
                    job_id,
                    replace(row, next_attempt_time=now, attempts=max(row.attempts - 1, 0), update_time=now),
                )


class _Profiles(_Queue):
    def __init__(self, view: _View) -> None:
        super().__init__(view, view.profiles)

    @staticmethod
    def _is_pending(row: Any) -> bool:
        return bool(row.state is ProfileState.PENDING)

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

    async def claim(self, user_id: int, now: datetime, lease_until: datetime) -> ports.ProfileClaim | None:
        row = self._lease(user_id, now, lease_until)
        if row is None:
            return None
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


class _EmailTokens:
    def __init__(self, view: _View) -> None:
        self._v = view

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
        v = self._v
        if v.users.get(user_id) is None:
            raise ValueError("foreign key: no such user")
        if any(row.token_hash == token_hash for _, row in v.email_tokens.items()):
            raise ValueError("unique: token hash exists")
        token = ports.EmailToken(
            id=next(v.data.email_token_ids),
            user_id=user_id,
            purpose=purpose,
            code_hash=code_hash,
            code_failures=0,
            expire_time=_utc(expire_time),
            use_time=None,
        )
        v.email_tokens.put(token.id, _TokenRow(token, token_hash))

    async def by_hash(self, token_hash: str) -> ports.EmailToken | None:
        return next(
            (row.token for _, row in self._v.email_tokens.items() if row.token_hash == token_hash), None
        )

    def _unused(self, user_id: int, purpose: str) -> list[_TokenRow]:
        return [
            row
            for _, row in sorted(self._v.email_tokens.items())
            if row.token.user_id == user_id and row.token.purpose == purpose and row.token.use_time is None
        ]

    async def with_codes(self, user_id: int, purpose: str, now: datetime) -> list[ports.EmailToken]:
        return [
            row.token
            for row in self._unused(user_id, purpose)
            if row.token.expire_time > now and row.token.code_hash is not None
        ]

    async def use(self, token_id: int, now: datetime) -> bool:
        row = self._v.email_tokens.get(token_id)
        if row is None or row.token.use_time is not None or row.token.expire_time <= now:
            return False
        self._v.email_tokens.put(token_id, replace(row, token=replace(row.token, use_time=_utc(now))))
        return True

    async def use_all(self, user_id: int, purpose: str, now: datetime) -> None:
        for row in self._unused(user_id, purpose):
            self._v.email_tokens.put(row.token.id, replace(row, token=replace(row.token, use_time=_utc(now))))

    async def count_code_failure(self, token_ids: Sequence[int]) -> None:
        for token_id in token_ids:
            row = self._v.email_tokens.get(token_id)
            if row is not None:
                token = replace(row.token, code_failures=row.token.code_failures + 1)
                self._v.email_tokens.put(token_id, replace(row, token=token))

    async def discard(self, token_hash: str) -> None:
        for token_id, row in self._v.email_tokens.items():
            if row.token_hash == token_hash:
                self._v.email_tokens.delete(token_id)


class _Mails(_Queue):
    def __init__(self, view: _View) -> None:
        super().__init__(view, view.mails)

    @staticmethod
    def _is_pending(row: Any) -> bool:
        return bool(row.state == "pending")

    async def enqueue(
        self, kind: str, *, email_key: str, message_id: str, now: datetime, user_id: int | None = None
    ) -> None:
        v = self._v
        if user_id is not None and v.users.get(user_id) is None:
            raise ValueError("foreign key: no such user")
        now = _utc(now)
        row = _MailRow(
            id=next(v.data.mail_ids),
            kind=kind,
            user_id=user_id,
            email_key=email_key,
            state="pending",
            message_id=message_id,
            attempts=0,
            next_attempt_time=now,
            last_error=None,
            update_time=now,
        )
        v.mails.put(row.id, row)

    async def claim(self, mail_id: int, now: datetime, lease_until: datetime) -> ports.MailClaim | None:
        row = self._lease(mail_id, now, lease_until)
        if row is None:
            return None
        return ports.MailClaim(
            id=row.id,
            kind=row.kind,
            user_id=row.user_id,
            email_key=row.email_key,
            message_id=row.message_id,
            attempts=row.attempts,
        )

    async def finish(self, mail_id: int, state: str, now: datetime, *, error: str = "") -> None:
        row = self._pending(mail_id)
        if row is not None:
            self._v.mails.put(
                mail_id,
                replace(
                    row,
                    state=state,
                    next_attempt_time=None,
                    last_error=error[:_ERROR_MAX] or None,
                    update_time=_utc(now),
                ),
            )


class _Rewards:
    """The referral programme's port: each method runs without an await between its check and
    its write, so it is atomic like the statement it mirrors."""

    def __init__(self, view: _View) -> None:
        self._v = view

    async def add_conversion(self, conversion: ports.NewConversion, now: datetime) -> Conversion:
        key = (conversion.source, conversion.event_id)
        if self._v.conversion_ids.get(key) is not None:
            raise Conflict(ports.CONVERSION_TAKEN)
        row = Conversion(
            id=next(self._v.data.conversion_seq),
            source=conversion.source,
            event_id=conversion.event_id,
            fingerprint=conversion.fingerprint,
            user_id=conversion.user_id,
            kind=conversion.kind,
            occur_time=_utc(conversion.occur_time),
            create_time=_utc(now),
            value=conversion.value,
        )
        self._v.conversions.put(row.id, row)
        self._v.conversion_ids.put(key, row.id)
        return row

    async def conversion(self, source: int, event_id: str) -> Conversion | None:
        conversion_id = self._v.conversion_ids.get((source, event_id))
        return self._v.conversions.get(conversion_id) if conversion_id is not None else None

    async def reverse_conversion(self, conversion_id: int, now: datetime) -> bool:
        row = self._v.conversions.get(conversion_id)
        if row is None or row.reverse_time is not None:
            return False
        self._v.conversions.put(conversion_id, replace(row, reverse_time=_utc(now)))
        return True

    async def qualifying(self, user_id: int, kinds: Sequence[str]) -> tuple[int, int | None]:
        ids = [
            row.id
            for _, row in self._v.conversions.items()
            if row.user_id == user_id and row.kind in kinds and row.reverse_time is None
        ]
        return len(ids), max(ids, default=None)

    async def ensure_referral(self, referee_id: int, referrer_id: int, now: datetime) -> None:
        if self._v.referral_states.get(referee_id) is None:
            self._v.referral_states.put(
                referee_id,
                ReferralStatus(
                    referee_id=referee_id,
                    referrer_id=referrer_id,
                    state=ReferralState.PENDING,
                    review=None,
                    signals=(),
                    review_note="",
                    create_time=_utc(now),
                    update_time=_utc(now),
                ),
            )

    async def referral(self, referee_id: int, *, lock: bool = False) -> ReferralStatus | None:
        return self._v.referral_states.get(referee_id)

    async def move_referral(
        self, referee_id: int, from_states: Sequence[ReferralState], to: ReferralState, now: datetime
    ) -> bool:
        row = self._v.referral_states.get(referee_id)
        if row is None or row.state not in from_states:
            return False
        at = _utc(now)
        row = replace(row, state=to, update_time=at)
        if to is ReferralState.QUALIFIED:
            row = replace(row, qualify_time=at)
        elif to is ReferralState.REWARDED:
            row = replace(row, reward_time=at)
        self._v.referral_states.put(referee_id, row)
        return True

    async def record_signals(self, referee_id: int, signals: Sequence[str], now: datetime) -> None:
        row = self._v.referral_states.get(referee_id)
        if row is None:
            return
        review = row.review if row.review is not None or not signals else ReviewState.HELD
        self._v.referral_states.put(
            referee_id,
            replace(
                row, signals=tuple(sorted(set(signals))), screened=True, review=review, update_time=_utc(now)
            ),
        )

    async def referred_between(self, referrer_id: int, start: datetime, end: datetime) -> int:
        count = 0
        for user_id in self._v.referral_ids.get(referrer_id) or ():
            user = self._v.users.get(user_id)
            if user is not None and start <= user.create_time <= end:
                count += 1
        return count

    async def review_referral(self, referee_id: int, verdict: str, note: str, now: datetime) -> bool:
        row = self._v.referral_states.get(referee_id)
        if row is None or row.review is not ReviewState.HELD:
            return False
        at = _utc(now)
        self._v.referral_states.put(
            referee_id,
            replace(row, review=ReviewState(verdict), review_note=note, review_time=at, update_time=at),
        )
        return True

    async def held_page(self, after_id: int, limit: int) -> list[ReferralStatus]:
        held = sorted(
            (
                row
                for key, row in self._v.referral_states.items()
                if key > after_id and row.review is ReviewState.HELD
            ),
            key=lambda row: row.referee_id,
        )
        return held[: max(limit, 0)]

    async def add_entries(self, entries: Sequence[ports.NewRewardEntry], now: datetime) -> list[int]:
        ids = []
        for entry in entries:
            if entry.corrects_id is not None and self._v.corrections.get(entry.corrects_id) is not None:
                raise Conflict(ports.REWARD_CORRECTED)
            entry_id = next(self._v.data.entry_seq)
            if entry.corrects_id is not None:
                self._v.corrections.put(entry.corrects_id, entry_id)
            self._v.entries.put(entry_id, _EntryRow(entry_id, entry, _utc(now)))
            ids.append(entry_id)
        return ids

    def _reward(self, row: _EntryRow) -> Reward:
        entry = row.entry
        correction_id = self._v.corrections.get(row.id)
        correction = self._v.entries.get(correction_id) if correction_id is not None else None
        return Reward(
            id=row.id,
            user_id=entry.user_id,
            referee_id=entry.referee_id,
            role=entry.role,
            amount=entry.amount,
            unit=entry.unit,
            rule=entry.rule,
            conversion_id=entry.conversion_id,
            create_time=row.create_time,
            available_time=_utc(entry.available_time) if entry.available_time is not None else None,
            correction=correction.entry.kind if correction is not None else None,
            correct_time=correction.create_time if correction is not None else None,
        )

    def _grants(self, keep: Callable[[ports.NewRewardEntry], bool]) -> list[Reward]:
        rows = sorted(
            (row for _, row in self._v.entries.items() if row.entry.kind == GRANT and keep(row.entry)),
            key=lambda row: row.id,
        )
        return [self._reward(row) for row in rows]

    async def rewards_of_conversion(self, conversion_id: int) -> list[Reward]:
        return self._grants(lambda entry: entry.conversion_id == conversion_id)

    async def rewards_page(self, user_id: int, after_id: int, limit: int) -> list[Reward]:
        mine = [
            r
            for r in reversed(self._grants(lambda entry: entry.user_id == user_id))
            if not after_id or r.id < after_id
        ]
        return mine[: max(limit, 0)]

    async def rewards_of(self, user_id: int) -> list[Reward]:
        return self._grants(lambda entry: entry.user_id == user_id)

    async def bump(
        self, referrer_id: int, period: str, name: str, delta: int, cap: int | None = None
    ) -> bool:
        key = (referrer_id, period, name)
        value = (self._v.counters.get(key) or 0) + delta
        if cap is not None and value > cap:
            return False
        self._v.counters.put(key, value)
        return True

    async def counters(self, referrer_id: int, period: str) -> dict[str, int]:
        return {
            name: value
            for (owner, at, name), value in self._v.counters.items()
            if owner == referrer_id and at == period
        }

    async def top(
        self, period: str, name: str, after: tuple[int, int] | None, limit: int
    ) -> list[tuple[int, int]]:
        rows = sorted(
            (
                (owner, value)
                for (owner, at, counter), value in self._v.counters.items()
                if at == period and counter == name and value > 0
            ),
            key=lambda row: (-row[1], row[0]),
        )
        if after is not None:
            value, owner = after
            rows = [row for row in rows if row[1] < value or (row[1] == value and row[0] > owner)]
        return rows[: max(limit, 0)]


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
        self.email_tokens = _EmailTokens(view)
        self.mails = _Mails(view)
        self.rewards = _Rewards(view)
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
        for token_id, token_row in v.email_tokens.items():
            if token_row.token.expire_time <= now:
                v.email_tokens.delete(token_id)
                deleted += 1
        cutoff = now - ports.MAIL_RETENTION
        for mail_id, mail in v.mails.items():
            if mail.state != "pending" and mail.update_time <= cutoff:
                v.mails.delete(mail_id)
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

    def set_verified(self, user_id: int) -> None:
        """Mark the account verified, as the email verification flow does. For tests."""
        row = self._data.users.get(user_id)
        if row is None:
            raise KeyError(user_id)
        self._data.users[user_id] = replace(row, is_verified=True)


if TYPE_CHECKING:
    _conforms: ports.Store = MemoryStore()
