"""What the domain needs from the outside world, declared as Protocols (hexagonal "ports").

Adapters implement them: ``referral_service.storage`` (SQLAlchemy: SQLite, PostgreSQL),
``referral_service.redis`` (Redis), ``referral_service.memory`` (in-process twins of every
port, used for the embedded default and for fast domain tests) and
``referral_service.integrations`` (HTTP providers). The domain imports none of them: the
composition root (``app.py``) hands the use cases their adapters.

Storage
-------
A use case runs its reads and writes on a :class:`UnitOfWork`, which offers one repository per
aggregate. ``Store.read()`` opens one for reads (autocommit: each statement sees committed
data); ``Store.transact(work)`` runs ``work`` in one transaction, committed when it returns and
rolled back when it raises. Which queries run how (Core or ORM, prebuilt statements, ``BEGIN
IMMEDIATE`` on SQLite, finishing a transaction whose caller was cancelled) is the adapter's
business.

Unique constraints are the database's to enforce: a write that breaks one raises
:class:`Conflict` naming which (the constants below), and the transaction is rolled back.
Use cases never check-then-insert.

Every time is timezone-aware UTC. Every method may raise ``errors.Unavailable`` when the
store cannot be reached.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol, TypeVar

from referral_service.domain.models import (
    ClientInfo,
    Conversion,
    DueDelivery,
    EmailStatus,
    Event,
    EventDraft,
    Money,
    Profile,
    ProfileState,
    Referral,
    ReferralCode,
    ReferralState,
    ReferralStatus,
    Reward,
    RewardRole,
    ServiceAccount,
    User,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)

T = TypeVar("T")
_NO_CLIENT = ClientInfo()

# --- conflicts -------------------------------------------------------------------------------

#: Another account has this email (its normalised key).
EMAIL_TAKEN = "uq_users_email_key"
#: Another code has this code (case-insensitively), now or ever.
CODE_TAKEN = "uq_referral_codes_code_key"
#: The owner already has an open (live or not yet closed) code.
OPEN_CODE_EXISTS = "uq_referral_codes_open_owner"
#: The (scope, request_id) pair is already remembered.
REQUEST_ID_TAKEN = "pk_idempotency_keys"
#: Another service account has this name.
SERVICE_ACCOUNT_TAKEN = "uq_service_accounts_name"
#: The reporting service already recorded a conversion with this event id.
CONVERSION_TAKEN = "uq_conversions_source_event_id"
#: The grant already has its correction (cancel or clawback).
REWARD_CORRECTED = "uq_reward_entries_corrects_id"


class Conflict(Exception):
    """A unique constraint refused a write; ``constraint`` names which one (see above)."""

    def __init__(self, constraint: str) -> None:
        super().__init__(constraint)
        self.constraint = constraint


# --- records that are not domain models --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a login needs of an account."""

    user_id: int
    password_hash: str
    is_active: bool


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A login session and the one refresh token that may be used next."""

    id: str
    user_id: int
    refresh_jti: str
    create_time: datetime
    #: The last refresh (None: never refreshed).
    refresh_time: datetime | None
    #: When its current refresh token expires.
    expire_time: datetime
    revoke_time: datetime | None
    revoke_reason: str | None
    #: Where it was last used from (login or refresh); "" when unknown.
    client_address: str = ""
    user_agent: str = ""

    def live(self, now: datetime) -> bool:
        return self.revoke_time is None and self.expire_time > now


#: Why a session was revoked (``SessionRecord.revoke_reason``).
REVOKED_BY_LOGOUT = "logout"
REVOKED_BY_REUSE = "reuse"
REVOKED_BY_LIMIT = "limit"
REVOKED_BY_OPERATOR = "operator"
REVOKED_BY_PASSWORD_CHANGE = "password"


@dataclass(frozen=True, slots=True)
class RememberedRequest:
    """An AIP-155 request id: what the first request was (fingerprint) and what it made."""

    fingerprint: str
    resource_id: int


@dataclass(frozen=True, slots=True)
class NewUser:
    email: str
    email_key: str
    password_hash: str
    is_superuser: bool = False
    referrer_id: int | None = None
    referral_code_id: int | None = None
    is_verified: bool = False
    #: ``EmailStatus`` value; None when the email was not checked.
    email_verification: str | None = None
    email_verify_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class NewCode:
    code: str
    code_key: str
    owner_id: int
    expire_time: datetime
    max_uses: int


@dataclass(frozen=True, slots=True)
class ProfileClaim:
    """A claimed enrichment lookup: the address to look up and which attempt this is."""

    email: str
    attempts: int


@dataclass(frozen=True, slots=True)
class PersonData:
    """What an enrichment provider found about a person."""

    full_name: str | None = None
    company: str | None = None
    title: str | None = None
    location: str | None = None
    avatar_uri: str | None = None

    def empty(self) -> bool:
        return not any((self.full_name, self.company, self.title, self.location, self.avatar_uri))


# --- repositories ------------------------------------------------------------------------------


class Users(Protocol):
    async def add(self, user: NewUser, now: datetime) -> User:
        """Insert an account (active, no referrals yet). Conflict(EMAIL_TAKEN)."""
        ...

    async def get(self, user_id: int) -> User | None:
        """The account with its profile (when enrichment queued one)."""
        ...

    async def by_email_key(self, email_key: str) -> User | None: ...

    async def credentials(self, email_key: str) -> Credentials | None: ...

    async def set_password_hash(self, user_id: int, password_hash: str, now: datetime) -> None: ...

    async def make_superuser(self, user_id: int, now: datetime) -> User | None: ...

    async def mark_verified(self, user_id: int, now: datetime) -> bool:
        """Record that the owner proved the address; False when it already was."""
        ...

    async def count_referral(self, referrer_id: int) -> None:
        """One more referral of ``referrer_id`` (the O(1) ``total_size`` counter)."""
        ...


class Codes(Protocol):
    """Referral codes. A code is *open* until it is closed (revoked, or found dead when its
    owner creates the next one); at most one open code per owner. A code is *live* when it is
    open, unrevoked, unexpired and not used up: the one definition of "live" is the adapter's
    query for it (``live_by_email_key`` and ``claim_use``). A code key (the code upper-cased)
    names one code at a time, and only ever codes of one owner (``reclaim``)."""

    async def add(self, code: NewCode, now: datetime) -> ReferralCode:
        """Insert an open code. Conflict(CODE_TAKEN) or Conflict(OPEN_CODE_EXISTS)."""
        ...

    async def get(self, code_id: int) -> ReferralCode | None: ...

    async def by_key(self, code_key: str) -> ReferralCode | None: ...

    async def open_code(self, owner_id: int) -> ReferralCode | None: ...

    async def close_dead(self, owner_id: int, now: datetime) -> None:
        """Close the owner's open code if it has expired or been used up (frees the slot)."""
        ...

    async def revoke_open(self, owner_id: int, now: datetime) -> ReferralCode | None:
        """Revoke and close the owner's open code; None when there is none."""
        ...

    async def reclaim(self, owner_id: int, code_key: str) -> bool:
        """Let the owner issue ``code_key`` again: their *closed* code with this key gives the key
        up (it keeps its ``code`` and its referrals, as history). False, changing nothing, when
        the key is free, someone else's, or on the owner's open code. Call it in the transaction
        that adds the new code, so that the key is never free in between."""
        ...

    async def live_by_email_key(self, email_key: str, now: datetime) -> ReferralCode | None:
        """The live code of the account with this email."""
        ...

    async def claim_use(self, code_id: int, now: datetime) -> bool:
        """Atomically count one use of a live code; False when it is not live (any number of
        concurrent claims never push ``use_count`` past ``max_uses``)."""
        ...


class Referrals(Protocol):
    async def page(
        self, referrer_id: int, after_id: int, limit: int, state: ReferralState | None = None
    ) -> list[Referral]:
        """Referrals of ``referrer_id`` with user id > ``after_id``, by id (keyset), with their
        state (only those in ``state`` when given)."""
        ...

    async def count(self, referrer_id: int) -> int | None:
        """How many referrals ``referrer_id`` has; None when there is no such user."""
        ...


class Sessions(Protocol):
    """Login sessions, one row each: the session's current refresh token and its revoked
    state (kept until that token would have expired), plus the revocation records of access
    tokens (``jti:<id>``) and sessions (``sid:<id>``), kept until they expire.

    ``rotate`` and ``revoke`` of one session serialise on it: once ``revoke`` has committed,
    no ``rotate`` of that session succeeds, and a ``rotate`` that committed first is revoked
    with the session."""

    async def add(
        self,
        *,
        session_id: str,
        user_id: int,
        refresh_jti: str,
        now: datetime,
        expire_time: datetime,
        client: ClientInfo = _NO_CLIENT,
    ) -> None: ...

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
        """Replace the session's refresh token by ``new_jti`` if ``refresh_jti`` is its current
        one and the session is live (unrevoked, unexpired); exactly one of any number of
        concurrent callers with the same token gets True."""
        ...

    async def get(self, session_id: str) -> SessionRecord | None: ...

    async def revoke(self, session_ids: Sequence[str], now: datetime, reason: str) -> None:
        """Revoke the sessions (a revoked one keeps its first revocation)."""
        ...

    async def live(self, user_id: int, now: datetime) -> list[SessionRecord]:
        """The user's live sessions, oldest first."""
        ...

    async def add_revocations(self, entries: Sequence[tuple[str, datetime]]) -> None:
        """Record revoked keys until their expiry (a later expiry wins)."""
        ...

    async def any_revoked(self, keys: Sequence[str], now: datetime) -> bool: ...

    async def live_revocations(self, now: datetime) -> list[tuple[str, datetime]]: ...


class Requests(Protocol):
    """AIP-155 request ids, per scope."""

    async def get(self, scope: str, request_id: str, now: datetime) -> RememberedRequest | None:
        """The unexpired record of this id."""
        ...

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
        """Conflict(REQUEST_ID_TAKEN) when a live record exists (an expired one is replaced)."""
        ...


class Profiles(Protocol):
    """Enrichment jobs and their results (one row per user)."""

    async def add_job(self, user_id: int, now: datetime) -> Profile:
        """A pending lookup, due now."""
        ...

    async def due(self, now: datetime, limit: int) -> list[int]:
        """User ids of pending lookups due by ``now``, earliest first."""
        ...

    async def next_due_time(self, exclude: Sequence[int] = ()) -> datetime | None: ...

    async def claim(self, user_id: int, now: datetime, lease_until: datetime) -> ProfileClaim | None:
        """Take the lease of a due lookup and count the attempt (compare-and-set); None when it
        is not due (finished, or claimed by another worker)."""
        ...

    async def finish(
        self,
        user_id: int,
        state: ProfileState,
        now: datetime,
        *,
        source: str,
        person: PersonData | None = None,
        error: str = "",
    ) -> None: ...

    async def reschedule(self, user_id: int, now: datetime, next_time: datetime, *, error: str) -> None: ...

    async def release(self, user_ids: Sequence[int], now: datetime) -> None:
        """Hand interrupted lookups back: due now, the interrupted attempt not counted."""
        ...


class ServiceAccounts(Protocol):
    async def add(
        self, *, name: str, client_id: str, secret_hash: str, scopes: Sequence[str], now: datetime
    ) -> ServiceAccount:
        """Conflict(SERVICE_ACCOUNT_TAKEN) when the name is taken (revoked accounts keep it)."""
        ...

    async def by_client_id(self, client_id: str) -> ServiceAccount | None: ...

    async def by_name(self, name: str) -> ServiceAccount | None: ...

    async def all(self) -> list[ServiceAccount]:
        """Every account, revoked ones too, by name."""
        ...

    async def revoke(self, account_id: int, now: datetime) -> None:
        """Revoke the account (a revoked one keeps its first revocation)."""
        ...


#: Purposes of email tokens.
VERIFY_EMAIL = "verify_email"
PASSWORD_RESET = "password_reset"
#: A kind of mail in the queue besides the two token purposes: a notice.
PASSWORD_CHANGED = "password_changed"
#: Messages sent, skipped or refused are kept this long (for operators), then purged.
MAIL_RETENTION = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class EmailToken:
    id: int
    user_id: int
    purpose: str
    code_hash: str | None
    code_failures: int
    expire_time: datetime
    use_time: datetime | None


class EmailTokens(Protocol):
    """Single-use secrets sent by email, stored as hashes."""

    async def add(
        self,
        *,
        user_id: int,
        purpose: str,
        token_hash: str,
        code_hash: str | None,
        now: datetime,
        expire_time: datetime,
    ) -> None: ...

    async def by_hash(self, token_hash: str) -> EmailToken | None: ...

    async def with_codes(self, user_id: int, purpose: str, now: datetime) -> list[EmailToken]:
        """The user's unused, unexpired tokens of ``purpose`` that carry a code."""
        ...

    async def use(self, token_id: int, now: datetime) -> bool:
        """Mark the token used, if it is unused and unexpired (atomic); whether it was."""
        ...

    async def use_all(self, user_id: int, purpose: str, now: datetime) -> None:
        """Mark every unused token of the user and purpose used (a newer one was used)."""
        ...

    async def count_code_failure(self, token_ids: Sequence[int]) -> None: ...

    async def discard(self, token_hash: str) -> None:
        """Delete a token whose message could not be sent."""
        ...


@dataclass(frozen=True, slots=True)
class MailClaim:
    """A claimed message of the mail queue."""

    id: int
    kind: str
    user_id: int | None
    email_key: str
    message_id: str
    attempts: int


class Mails(Protocol):
    """The mail queue (outbox), written in the transaction of the change that calls for a
    message and drained by the mail worker."""

    async def enqueue(
        self, kind: str, *, email_key: str, message_id: str, now: datetime, user_id: int | None = None
    ) -> None: ...

    async def due(self, now: datetime, limit: int) -> list[int]: ...

    async def next_due_time(self, exclude: Sequence[int] = ()) -> datetime | None: ...

    async def claim(self, mail_id: int, now: datetime, lease_until: datetime) -> MailClaim | None:
        """Take a due message for a lease (atomic: one worker wins); None when not due."""
        ...

    async def finish(self, mail_id: int, state: str, now: datetime, *, error: str = "") -> None:
        """``sent``, ``skipped`` or ``failed``."""
        ...

    async def reschedule(self, mail_id: int, now: datetime, next_time: datetime, *, error: str) -> None: ...

    async def release(self, mail_ids: Sequence[int], now: datetime) -> None:
        """Hand back claimed messages at shutdown (due at once, the attempt not counted)."""


@dataclass(frozen=True, slots=True)
class NewConversion:
    source: int
    event_id: str
    fingerprint: str
    user_id: int
    kind: str
    occur_time: datetime
    value: Money | None = None


@dataclass(frozen=True, slots=True)
class NewRewardEntry:
    """A ledger entry: a grant (``corrects_id`` None, positive amount) or the correction of one
    (``cancel`` / ``clawback``, the negated amount)."""

    kind: str
    user_id: int
    referee_id: int
    role: RewardRole
    amount: int
    unit: str
    rule: str
    conversion_id: int | None
    available_time: datetime | None = None
    corrects_id: int | None = None


class Rewards(Protocol):
    """Referral states, conversions, the append-only reward ledger and the per-referrer
    counters (issue 17). Every change that must be atomic is one conditional statement."""

    async def add_conversion(self, conversion: NewConversion, now: datetime) -> Conversion:
        """Conflict(CONVERSION_TAKEN) when the source already recorded this event id."""
        ...

    async def conversion(self, source: int, event_id: str) -> Conversion | None: ...

    async def reverse_conversion(self, conversion_id: int, now: datetime) -> bool:
        """Mark it reversed; False when it already was (exactly one concurrent caller wins)."""
        ...

    async def qualifying(self, user_id: int, kinds: Sequence[str]) -> tuple[int, int | None]:
        """How many unreversed conversions of these kinds the user has, and the latest's id."""
        ...

    async def ensure_referral(self, referee_id: int, referrer_id: int, now: datetime) -> None:
        """Make the referral's state row (PENDING) unless it exists."""
        ...

    async def referral(self, referee_id: int, *, lock: bool = False) -> ReferralStatus | None:
        """None: no state row (a referred user without one is PENDING). ``lock``: hold the row
        until the transaction ends, so that evaluations of one referral run one at a time."""
        ...

    async def move_referral(
        self, referee_id: int, from_states: Sequence[ReferralState], to: ReferralState, now: datetime
    ) -> bool:
        """Compare-and-set of the state; True for exactly one of concurrent movers."""
        ...

    async def record_signals(self, referee_id: int, signals: Sequence[str], now: datetime) -> None:
        """Record the fraud screening of the referral (``signals`` may be empty: screened,
        clean); with signals, the referral is held for review unless it was reviewed."""
        ...

    async def referred_between(self, referrer_id: int, start: datetime, end: datetime) -> int:
        """How many users registered with the referrer's codes in [start, end]."""
        ...

    async def review_referral(self, referee_id: int, verdict: str, note: str, now: datetime) -> bool:
        """Set the review verdict of a held referral (``approved`` / ``rejected``); False when
        it is not held."""
        ...

    async def held_page(self, after_id: int, limit: int) -> list[ReferralStatus]:
        """Referrals held for review, by referee id (keyset)."""
        ...

    async def add_entries(self, entries: Sequence[NewRewardEntry], now: datetime) -> list[int]:
        """Append ledger entries; their ids. Conflict(REWARD_CORRECTED) for a second correction."""
        ...

    async def rewards_of_conversion(self, conversion_id: int) -> list[Reward]: ...

    async def rewards_page(self, user_id: int, after_id: int, limit: int) -> list[Reward]:
        """The user's rewards (grants with their correction), newest first, id < ``after_id``
        (0: from the newest)."""
        ...

    async def rewards_of(self, user_id: int) -> list[Reward]:
        """Every reward of the user (their grants with their corrections)."""
        ...

    async def bump(
        self, referrer_id: int, period: str, name: str, delta: int, cap: int | None = None
    ) -> bool:
        """Add ``delta`` to a counter (made at 0); with ``cap``, only if the result stays within
        it (False, changing nothing, otherwise). Atomic under concurrency."""
        ...

    async def counters(self, referrer_id: int, period: str) -> dict[str, int]: ...

    async def top(
        self, period: str, name: str, after: tuple[int, int] | None, limit: int
    ) -> list[tuple[int, int]]:
        """(referrer id, value) by value descending then id, after (value, id) (keyset)."""


class Events(Protocol):
    """The outbox: events appended in the transaction of the change they describe, read back
    by cursor. Cursors increase in commit order: once a reader has seen cursor ``c``, no event
    with a cursor at or below ``c`` commits later (the adapter serialises appends where its
    database would not)."""

    async def append(self, draft: EventDraft, now: datetime) -> None:
        """Add the event to this transaction (it commits, or rolls back, with the change)."""
        ...

    async def after(
        self, cursor: int, types: Sequence[str], limit: int, upto: int | None = None
    ) -> list[Event]:
        """Events with ``cursor < event.cursor (<= upto)`` of the given types (all when empty),
        by cursor, at most ``limit``."""
        ...

    async def head(self) -> int:
        """The newest event's cursor (0 when there has never been one)."""
        ...

    async def purged_through(self) -> int:
        """Every event up to this cursor has been purged (0: none ever was)."""
        ...

    async def purge(self, before: datetime) -> int:
        """Delete events older than ``before``, always keeping the newest one (it holds the
        head cursor); the rows deleted."""
        ...


class Webhooks(Protocol):
    """Webhook endpoints and their deliveries. Each method is its own transaction (the
    deliveries are background work, never part of a user's call)."""

    async def add_endpoint(
        self, *, url: str, event_types: Sequence[str], description: str, secret: str, now: datetime
    ) -> WebhookEndpoint:
        """Register an endpoint; it receives the events committed after this."""
        ...

    async def endpoints(self, after_id: int, limit: int) -> list[WebhookEndpoint]: ...

    async def endpoint(self, endpoint_id: int) -> WebhookEndpoint | None: ...

    async def update_endpoint(
        self, endpoint_id: int, changes: Mapping[str, object], now: datetime
    ) -> WebhookEndpoint | None:
        """Set the columns in ``changes`` (url, event_types, description, disabled_time,
        disabled_reason, consecutive_failures); None when there is no such endpoint."""
        ...

    async def delete_endpoint(self, endpoint_id: int) -> bool: ...

    async def set_secret(self, endpoint_id: int, secret: str, now: datetime) -> bool: ...

    async def deliveries(self, endpoint_id: int, before_id: int | None, limit: int) -> list[WebhookDelivery]:
        """Newest first, with their attempts."""
        ...

    async def delivery(self, delivery_id: int) -> WebhookDelivery | None: ...

    async def retry(self, delivery_id: int, now: datetime) -> WebhookDelivery | None:
        """Make the delivery pending, due now."""
        ...

    async def fan_out(self, now: datetime, limit: int, body: Callable[[Event], str]) -> int:
        """Turn the events after the dispatch cursor into deliveries for the enabled endpoints
        that want them, and move the cursor past them, in one transaction (safe from any
        number of workers); the events handled."""
        ...

    async def claim_due(self, now: datetime, lease_until: datetime, limit: int) -> list[DueDelivery]:
        """Take the lease of due deliveries of enabled endpoints (compare-and-set)."""
        ...

    async def next_due_time(self) -> datetime | None:
        """When the next pending delivery of an enabled endpoint is due (or its lease ends)."""
        ...

    async def record(
        self,
        delivery: DueDelivery,
        attempt: WebhookAttempt,
        *,
        succeeded: bool,
        next_attempt_time: datetime | None,
        disable_after: int,
        disabled_event: Callable[[WebhookEndpoint], EventDraft],
        now: datetime,
    ) -> bool:
        """Record the attempt: succeeded, pending again at ``next_attempt_time``, or failed for
        good (None). The endpoint's run of failures grows or resets; at ``disable_after`` it is
        disabled and ``disabled_event`` appended, in the same transaction. True when this
        disabled it."""
        ...


class UnitOfWork(Protocol):
    """The repositories of one transaction (or, from ``Store.read()``, of autocommit reads)."""

    @property
    def users(self) -> Users: ...
    @property
    def codes(self) -> Codes: ...
    @property
    def referrals(self) -> Referrals: ...
    @property
    def sessions(self) -> Sessions: ...
    @property
    def requests(self) -> Requests: ...
    @property
    def profiles(self) -> Profiles: ...
    @property
    def service_accounts(self) -> ServiceAccounts: ...
    @property
    def email_tokens(self) -> EmailTokens: ...
    @property
    def mails(self) -> Mails: ...
    @property
    def rewards(self) -> Rewards: ...
    @property
    def events(self) -> Events: ...

    async def purge_expired(self, now: datetime) -> int:
        """Delete expired revocations, request ids and refresh tokens; the rows deleted."""
        ...


class Store(Protocol):
    """The system of record."""

    def read(self) -> AbstractAsyncContextManager[UnitOfWork]:
        """Reads in autocommit mode (no transaction to protect)."""
        ...

    async def transact(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        """Run ``work`` in one transaction: committed when it returns, rolled back when it
        raises (the exception propagates). A caller cancelled meanwhile does not interrupt the
        transaction midway: it ends (commit or rollback) before the cancellation propagates."""
        ...

    async def ping(self) -> bool:
        """Whether the store answers now."""
        ...


# --- fast stores (Redis or in-process) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheLookup:
    hit: bool
    #: On a hit, the cached bytes (``b""`` is a cached "nothing there").
    value: bytes | None = None
    #: On a miss, what ``fill`` needs; None when the cache must not be filled now.
    stamp: object | None = None


class VersionedCache(Protocol):
    """Cache-aside with versioned fills: a read racing an invalidation can never put the
    invalidated value back. ``lookup`` misses carry a stamp; ``fill`` stores only if no
    invalidation happened since the stamp was taken; ``invalidate`` runs after the commit.
    Never raises for an outage: a lookup misses, a fill is skipped, a failed invalidation makes
    the adapter bypass the cache until it is safe again."""

    async def lookup(self, key: str) -> CacheLookup: ...

    async def fill(self, key: str, stamp: object, value: bytes, ttl_seconds: float) -> None: ...

    async def invalidate(self, key: str) -> None: ...


class KeyValueCache(Protocol):
    """Plain values with a lifetime, never invalidated (answers of external providers)."""

    async def get(self, key: str) -> bytes | None:
        """None when absent, expired or the store is unavailable."""
        ...

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None: ...


class RevocationCache(Protocol):
    """The fast copy of the revocation records (the database keeps the record)."""

    #: True when every worker and replica sees the same store (Redis); False for a
    #: process-local copy, which can only short-cut what this process revoked.
    shared: bool

    async def revoke(self, keys: Sequence[str], ttl_seconds: float) -> bool:
        """False when the store could not be written."""
        ...

    async def any_revoked(self, keys: Sequence[str]) -> bool | None:
        """None when the store cannot tell (unavailable, or not seeded since it started)."""
        ...

    async def seed(self, entries: Sequence[tuple[str, float]]) -> bool:
        """Copy every live revocation (key, seconds left) in and mark the store seeded."""
        ...


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    #: Seconds until one more event would be allowed (0 when allowed).
    retry_after: float
    #: Events still allowed right now after this one.
    remaining: int


class RateLimiter(Protocol):
    """GCRA rate limits: ``limit`` events per ``period`` seconds per key. Always answers (an
    adapter whose shared store is down counts in the process meanwhile)."""

    async def acquire(self, key: str, limit: int, period: float) -> RateDecision: ...

    async def release(self, key: str, limit: int, period: float) -> None:
        """Give one event back."""
        ...


# --- credentials and tokens --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    #: A new hash to store when the stored one used other parameters.
    new_hash: str | None = None


class PasswordHasher(Protocol):
    """Slow, salted password hashing, off the event loop."""

    async def hash(self, password: str) -> str: ...

    async def verify(self, stored: str | None, password: str) -> VerifyResult:
        """Check ``password``; with ``stored=None`` (unknown account) take as long as a real
        check and fail, so that timing does not tell whether an account exists."""
        ...


#: Longest token accepted anywhere (a field longer than this is INVALID_ARGUMENT).
MAX_TOKEN_LENGTH = 4096


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    jti: str
    session_id: str
    expire_time: datetime


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    user_id: int
    jti: str
    session_id: str
    expire_time: datetime
    issue_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class VerifiedServiceToken:
    account_id: int
    client_id: str
    name: str
    scopes: tuple[str, ...]
    jti: str
    expire_time: datetime
    issue_time: datetime


#: What ``TokenCodec.kind_of`` says a token claims to be (verification still decides).
ACCESS_TOKEN = "access_token"
REFRESH_TOKEN = "refresh_token"
SERVICE_TOKEN = "service_token"


class TokenCodec(Protocol):
    """Signed access and refresh tokens of a login session (``session_id``), never accepted as
    each other. ``verify_*`` raise ``Unauthenticated`` (TOKEN_INVALID / TOKEN_EXPIRED) for a
    token that is malformed, forged, expired or of the other kind; revocation is the caller's
    business."""

    @property
    def access_ttl(self) -> timedelta: ...
    @property
    def refresh_ttl(self) -> timedelta: ...

    def issue_access(self, user_id: int, session_id: str, now: datetime) -> IssuedToken: ...

    def issue_refresh(self, user_id: int, session_id: str, now: datetime) -> IssuedToken: ...

    def verify_access(self, token: str) -> VerifiedToken: ...

    def verify_refresh(self, token: str) -> VerifiedToken: ...

    def issue_service(self, account: ServiceAccount, scopes: Sequence[str], now: datetime) -> IssuedToken:
        """A service token: like an access token, for a service account with scopes."""
        ...

    def verify_service(self, token: str) -> VerifiedServiceToken: ...

    def kind_of(self, token: str) -> str:
        """ACCESS_TOKEN, REFRESH_TOKEN or SERVICE_TOKEN as the token's (unverified) header
        claims, or "" when it claims none: which ``verify_*`` to call."""
        ...

    def jwks(self) -> list[dict[str, str]]:
        """The public keys (JWK) that verify the tokens; none for shared secrets."""
        ...


# --- providers (integrations) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verification:
    """What an email verification provider said about an address."""

    status: EmailStatus
    #: When the provider answered (or was given up on).
    checked_time: datetime
    #: Why there is no definite answer ("timeout", "http 429", ...): for logs, never shown.
    detail: str = ""
    #: A hint from the provider (Retry-After) or the circuit breaker.
    retry_after_seconds: float | None = None


class EmailVerifier(Protocol):
    """A verification provider. ``verify`` never raises for provider trouble: it returns
    ``EmailStatus.UNAVAILABLE`` with a detail, within its own time bound."""

    name: str

    async def verify(self, email: str) -> Verification: ...

    async def close(self) -> None: ...


class ProfileOutcome(StrEnum):
    FOUND = "found"
    NOT_FOUND = "not_found"
    #: Transient: timeout, outage, rate limit, quota, queued at the provider.
    RETRY = "retry"
    #: The provider will never answer this request (e.g. it rejects the address).
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ProfileLookup:
    outcome: ProfileOutcome
    person: PersonData | None = None
    #: For logs and ``last_error``; never personal data.
    detail: str = ""
    retry_after_seconds: float | None = None


class ProfileProvider(Protocol):
    """An enrichment provider. ``lookup`` never raises for provider trouble."""

    name: str

    async def lookup(self, email: str) -> ProfileLookup: ...

    async def close(self) -> None: ...


# --- mail --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutgoingMail:
    """A message to send: its kind picks the templates, ``context`` fills them."""

    to: str
    kind: str
    message_id: str
    context: dict[str, str]


class MailRejected(Exception):
    """The mail system refused the message for good (a 5xx answer): retrying will not help."""


class Mailer(Protocol):
    """Sends messages (SMTP, or a local mail directory). Raises ``MailRejected`` for a
    permanent refusal and any other exception for a failure worth retrying."""

    name: str

    async def send(self, mail: OutgoingMail) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class WebhookResponse:
    #: 0 when there was no HTTP answer.
    status: int
    latency_ms: int
    #: Why there was no usable answer (``timeout``, ``connect``, ``redirect``, ``forbidden
    #: address``); "" when the endpoint answered.
    error: str = ""


class WebhookSender(Protocol):
    """POSTs a signed webhook. Never follows redirects, never raises for the receiver's
    trouble, refuses addresses the server may not call (SSRF)."""

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> WebhookResponse: ...

    async def close(self) -> None: ...
