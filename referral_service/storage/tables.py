"""The schema. Alembic migrations under ``migrations/`` create it; this module mirrors them
(a test compares the two) and is what the repositories query.

Invariants live here, not in application code:
- one account per normalised email (``uq_users_email_key``);
- a code key (the code upper-cased) held by one referral code at a time (``code_key``), handed
  on only to a new code of the same owner (a closed code then has no key:
  ``ck_referral_codes_keyless_closed``);
- at most one open referral code per user: a partial unique index on ``owner_id`` where
  ``close_time IS NULL``;
- foreign keys everywhere (SQLite enforces them with ``PRAGMA foreign_keys=ON``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: 64-bit ids on PostgreSQL; SQLite needs INTEGER for its auto-incrementing rowid alias.
Id = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE`` on PostgreSQL; on SQLite a naive UTC string that sorts
    correctly. Python always sees timezone-aware UTC datetimes; naive ones are refused."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(String(320))
    email_key: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    is_active: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    is_verified: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    is_superuser: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    referrer_id: Mapped[int | None] = mapped_column(Id, ForeignKey("users.id"))
    referral_code_id: Mapped[int | None] = mapped_column(Id, ForeignKey("referral_codes.id", use_alter=True))
    #: Number of users referred by this user; kept in the same transaction as each referral,
    #: so ListReferrals' total_size costs O(1).
    referral_count: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)
    #: Outcome of the email check at registration (``valid``, ``accept_all``, ``webmail``,
    #: ``unknown``, ``unavailable``); NULL when it was not checked.
    email_verification: Mapped[str | None] = mapped_column(String(16))
    email_verify_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: When the owner proved the address (``is_verified`` became true); NULL until then.
    verify_time: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_users_referrer_id_id", "referrer_id", "id"),)


class ReferralCodeRow(Base):
    __tablename__ = "referral_codes"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(String(32))
    #: NULL on a closed code whose owner has issued it again (the newer code holds the key).
    code_key: Mapped[str | None] = mapped_column(String(32), unique=True)
    owner_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id"))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    expire_time: Mapped[datetime] = mapped_column(UTCDateTime)
    revoke_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Set when the code stops occupying its owner's single open slot (deleted, or replaced
    #: after it expired or was used up).
    close_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    max_uses: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    use_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))

    __table_args__ = (
        Index(
            "uq_referral_codes_open_owner",
            "owner_id",
            unique=True,
            sqlite_where=text("close_time IS NULL"),
            postgresql_where=text("close_time IS NULL"),
        ),
        Index("ix_referral_codes_owner_id_id", "owner_id", "id"),
        CheckConstraint("max_uses >= 0", name="max_uses_non_negative"),
        CheckConstraint("max_uses = 0 OR use_count <= max_uses", name="use_count_within_max"),
        CheckConstraint("code_key IS NOT NULL OR close_time IS NOT NULL", name="keyless_closed"),
    )


class SessionRow(Base):
    """A login session: the one refresh token that may be used next (``refresh_jti``; used
    ones are forgotten at once, a presented token that is not the current one is a reuse) and
    the session's revoked state, kept until its refresh token would have expired. Refreshing
    and revoking a session both update this row, so they serialise on its row lock."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id"))
    refresh_jti: Mapped[str] = mapped_column(String(64))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    #: The last refresh (None: never refreshed).
    refresh_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: When the current refresh token expires: the row is purged then.
    expire_time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    revoke_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Why it was revoked: ``logout``, ``reuse``, ``limit`` (too many sessions), ``password``.
    revoke_reason: Mapped[str | None] = mapped_column(String(16))
    #: Where it was last used from (login or refresh).
    client_address: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(256))

    #: A user's live sessions (each login reads them to enforce the cap): revoked ones, kept
    #: until they expire, are left out of the index.
    __table_args__ = (
        Index(
            "ix_sessions_live_user",
            "user_id",
            "create_time",
            sqlite_where=text("revoke_time IS NULL"),
            postgresql_where=text("revoke_time IS NULL"),
        ),
    )


class ServiceAccountRow(Base):
    """An internal service's credentials: a public client id and, of its secret, only a keyed
    hash (HMAC-SHA256; the secret has 256 bits of entropy, so a slow hash would add nothing)."""

    __tablename__ = "service_accounts"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    client_id: Mapped[str] = mapped_column(String(64), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(128))
    #: Space-separated.
    scopes: Mapped[str] = mapped_column(String(512))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    revoke_time: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RevocationRow(Base):
    """Durable record of revoked access tokens (``jti:<id>``) and sessions (``sid:<id>``),
    kept until the last token they cover has expired. Redis or the in-process store serve the
    hot path; this table survives their restarts and answers when Redis is down."""

    __tablename__ = "revocations"

    key: Mapped[str] = mapped_column(String(80), primary_key=True)
    expire_time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class IdempotencyRow(Base):
    """AIP-155 request ids: a retry with the same id returns the first result."""

    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[int] = mapped_column(Id)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    expire_time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class UserProfileRow(Base):
    """The enrichment of one user: both the durable job (``state`` = ``pending`` with its next
    attempt time, which doubles as the lease of the worker that claimed it) and its outcome."""

    __tablename__ = "user_profiles"

    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    #: ``pending``, ``found``, ``not_found`` or ``failed``.
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    #: When a pending lookup is next due (or its current lease ends).
    next_attempt_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    full_name: Mapped[str | None] = mapped_column(String(200))
    company: Mapped[str | None] = mapped_column(String(200))
    title: Mapped[str | None] = mapped_column(String(200))
    location: Mapped[str | None] = mapped_column(String(200))
    avatar_uri: Mapped[str | None] = mapped_column(String(2048))
    source: Mapped[str | None] = mapped_column(String(32))
    fetch_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: Why the last attempt failed (no personal data, no secrets).
    last_error: Mapped[str | None] = mapped_column(String(200))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_user_profiles_state_next_attempt_time", "state", "next_attempt_time"),
        CheckConstraint("state IN ('pending', 'found', 'not_found', 'failed')", name="state_known"),
    )


class EmailTokenRow(Base):
    """A single-use secret sent by email: a verification link and code, or a password reset
    link. Only hashes are stored (SHA-256 of the 256-bit link token; of the 6-digit code with
    the user id, which the attempt counter and the expiry protect). Used or superseded tokens
    keep ``use_time``; rows are purged once expired."""

    __tablename__ = "email_tokens"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id", ondelete="CASCADE"))
    #: ``verify_email`` or ``password_reset``.
    purpose: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    code_hash: Mapped[str | None] = mapped_column(String(64))
    #: Wrong codes entered against this token; the code dies at the limit (the link does not).
    code_failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    expire_time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    use_time: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_email_tokens_user_id_purpose", "user_id", "purpose"),
        CheckConstraint("purpose IN ('verify_email', 'password_reset')", name="purpose_known"),
    )


class MailRow(Base):
    """The mail queue (an outbox): a row is inserted in the transaction of the change that
    calls for the message (a registration, a reset request), and the mail worker sends it.
    The message is composed when it is sent (a link token is created then and only its hash
    stored), so no secret waits in this table. ``next_attempt_time`` doubles as the lease of
    the worker that claimed it."""

    __tablename__ = "mail_outbox"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    #: ``verify_email``, ``password_reset`` or ``password_changed``.
    kind: Mapped[str] = mapped_column(String(32))
    #: The recipient's account, when known at enqueue time; otherwise resolved by email.
    user_id: Mapped[int | None] = mapped_column(Id, ForeignKey("users.id", ondelete="CASCADE"))
    email_key: Mapped[str] = mapped_column(String(320))
    #: ``pending``, ``sent``, ``skipped`` (nobody to send to) or ``failed`` (refused for good).
    state: Mapped[str] = mapped_column(String(16))
    #: The Message-ID header, fixed at enqueue: a message sent again after a crash carries the
    #: same id, so mail systems can drop the duplicate.
    message_id: Mapped[str] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(String(200))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)
    send_time: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_mail_outbox_state_next_attempt_time", "state", "next_attempt_time"),
        CheckConstraint("state IN ('pending', 'sent', 'skipped', 'failed')", name="state_known"),
    )


class ReferralStateRow(Base):
    """The lifecycle of a referral (issue 17): one row per referred user, made when the referral
    first changes (a conversion, a fraud signal); a referred user without a row is PENDING.
    ``state`` moves pending -> qualified -> rewarded (or rejected by a review); ``review`` is
    the fraud hold (``held`` until a reviewer approves or rejects it)."""

    __tablename__ = "referral_states"

    referee_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    referrer_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id", ondelete="CASCADE"))
    #: ``pending``, ``qualified``, ``rewarded`` or ``rejected``.
    state: Mapped[str] = mapped_column(String(16))
    #: NULL (never flagged), ``held``, ``approved`` or ``rejected``.
    review: Mapped[str | None] = mapped_column(String(16))
    #: The fraud signals recorded, space-separated.
    signals: Mapped[str | None] = mapped_column(String(256))
    review_note: Mapped[str | None] = mapped_column(String(500))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)
    qualify_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reward_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    review_time: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_referral_states_referrer_id_state", "referrer_id", "state"),
        Index(
            "ix_referral_states_review_held",
            "referee_id",
            sqlite_where=text("review = 'held'"),
            postgresql_where=text("review = 'held'"),
        ),
        CheckConstraint("state IN ('pending', 'qualified', 'rewarded', 'rejected')", name="state_known"),
    )


class ConversionRow(Base):
    """A qualifying event reported by a service (RecordConversion). ``(source, event_id)`` is
    unique: a retry or a concurrent duplicate finds the first one."""

    __tablename__ = "conversions"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    #: Who reported it: the service account's id.
    source: Mapped[int] = mapped_column(Id)
    event_id: Mapped[str] = mapped_column(String(128))
    fingerprint: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    value_currency: Mapped[str | None] = mapped_column(String(3))
    value_units: Mapped[int | None] = mapped_column(BigInteger)
    value_nanos: Mapped[int | None] = mapped_column(Integer)
    occur_time: Mapped[datetime] = mapped_column(UTCDateTime)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    reverse_time: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("uq_conversions_source_event_id", "source", "event_id", unique=True),
        Index("ix_conversions_user_id_id", "user_id", "id"),
    )


class RewardEntryRow(Base):
    """The reward ledger, append-only: a ``grant`` (positive amount, available from
    ``available_time``) and at most one correction of it (``cancel`` of a held grant, ``clawback``
    of an available one: the negated amount, ``corrects_id`` naming the grant). Rows are never
    updated; a reward's state is computed from its grant, its correction and the time."""

    __tablename__ = "reward_entries"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    #: ``grant``, ``cancel`` or ``clawback``.
    kind: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id", ondelete="CASCADE"))
    #: The referral (its referred user) the reward is for.
    referee_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id", ondelete="CASCADE"))
    #: ``referrer`` or ``referee``.
    role: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)
    unit: Mapped[str] = mapped_column(String(16))
    #: The rule that produced the entry (``<program id>/referrer``).
    rule: Mapped[str] = mapped_column(String(80))
    conversion_id: Mapped[int | None] = mapped_column(Id, ForeignKey("conversions.id", ondelete="CASCADE"))
    corrects_id: Mapped[int | None] = mapped_column(Id, ForeignKey("reward_entries.id", ondelete="CASCADE"))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    available_time: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index("ix_reward_entries_user_id_id", "user_id", "id"),
        Index("ix_reward_entries_conversion_id", "conversion_id"),
        Index("uq_reward_entries_corrects_id", "corrects_id", unique=True),
        CheckConstraint("kind IN ('grant', 'cancel', 'clawback')", name="kind_known"),
        CheckConstraint("(kind = 'grant') = (corrects_id IS NULL)", name="corrections_name_a_grant"),
        CheckConstraint("(kind = 'grant') = (amount > 0)", name="grants_positive"),
    )


class ReferrerCounterRow(Base):
    """Counters per referrer and period (``all`` or ``YYYY-MM``, UTC), kept in the transaction
    of each change: caps, GetReferralStats and ListTopReferrers read them instead of counting
    rows."""

    __tablename__ = "referrer_counters"

    referrer_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    period: Mapped[str] = mapped_column(String(8), primary_key=True)
    name: Mapped[str] = mapped_column(String(48), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))

    __table_args__ = (Index("ix_referrer_counters_board", "period", "name", "value", "referrer_id"),)


class EventRow(Base):
    """The transactional outbox: one row per event, written in the transaction of its change.
    ``cursor`` increases in commit order (appends serialise on PostgreSQL, see
    ``storage/events.py``; SQLite has one writer) and is never reused (AUTOINCREMENT)."""

    __tablename__ = "events"

    cursor: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    type: Mapped[str] = mapped_column(String(64))
    time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    #: The payload message's fields by their proto names, as JSON.
    data: Mapped[str] = mapped_column(Text)

    __table_args__ = ({"sqlite_autoincrement": True},)


class EventRetentionRow(Base):
    """One row: every event up to ``purged_through`` has been purged (retention), so a cursor
    below it cannot be resumed from."""

    __tablename__ = "event_retention"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    purged_through: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))


class WebhookEndpointRow(Base):
    """Where events are POSTed. ``secret`` signs them, so it is kept as issued (a hash would
    not sign); ``start_cursor``: only events after it are sent (those committed after the
    endpoint was registered)."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(String(2048))
    #: Space-separated; empty: every type.
    event_types: Mapped[str] = mapped_column(String(1024))
    description: Mapped[str] = mapped_column(String(500))
    secret: Mapped[str] = mapped_column(String(128))
    start_cursor: Mapped[int] = mapped_column(BigInteger)
    consecutive_failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    disabled_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_reason: Mapped[str | None] = mapped_column(String(16))
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)


class WebhookDeliveryRow(Base):
    """One event to send to one endpoint: the durable job (``state`` ``pending`` with its next
    attempt time, which doubles as the lease of the worker sending it) and its outcome."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    endpoint_id: Mapped[int] = mapped_column(Id, ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(40))
    event_type: Mapped[str] = mapped_column(String(64))
    #: The JSON body, as first built (every attempt sends the same bytes).
    body: Mapped[str] = mapped_column(Text)
    #: ``pending``, ``succeeded`` or ``failed``.
    state: Mapped[str] = mapped_column(String(16))
    attempt_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_id"),
        Index("ix_webhook_deliveries_endpoint_id_id", "endpoint_id", "id"),
        Index("ix_webhook_deliveries_state_next_attempt_time", "state", "next_attempt_time"),
        CheckConstraint("state IN ('pending', 'succeeded', 'failed')", name="state_known"),
    )


class WebhookAttemptRow(Base):
    """One HTTP request of a delivery."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(
        Id, ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True
    )
    time: Mapped[datetime] = mapped_column(UTCDateTime)
    http_status: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(200))


class WebhookDispatchRow(Base):
    """One row: the cursor of the last event turned into deliveries."""

    __tablename__ = "webhook_dispatch"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    cursor: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
