"""Domain values returned by use cases and turned into protos by the API layer."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, StrEnum
from typing import Any


class EmailStatus(StrEnum):
    """What the email verification provider said about an address (stored on the user)."""

    VALID = "valid"
    ACCEPT_ALL = "accept_all"
    WEBMAIL = "webmail"
    INVALID = "invalid"
    DISPOSABLE = "disposable"
    #: The provider answered, but could not tell.
    UNKNOWN = "unknown"
    #: No answer: timeout, outage, quota, bad key, malformed response, circuit open.
    UNAVAILABLE = "unavailable"


class ProfileState(StrEnum):
    PENDING = "pending"
    FOUND = "found"
    NOT_FOUND = "not_found"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Profile:
    """The outcome of the enrichment lookup of a user."""

    state: ProfileState
    full_name: str | None = None
    company: str | None = None
    title: str | None = None
    location: str | None = None
    avatar_uri: str | None = None
    source: str | None = None
    fetch_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class User:
    id: int
    email: str
    is_active: bool
    is_verified: bool
    is_superuser: bool
    referrer_id: int | None
    create_time: datetime
    #: The deliverability check at registration (Hunter); None when it was off. Never
    #: ownership: that is ``is_verified`` / ``verify_time``.
    email_verification: EmailStatus | None = None
    email_verify_time: datetime | None = None
    #: When the owner proved the address; None until then.
    verify_time: datetime | None = None
    #: None when no lookup was queued (enrichment off, or the address not yet verified).
    profile: Profile | None = None

    @property
    def email_key(self) -> str:
        """What emails are compared by (``validation.parse_email``: the stored address is
        already normalised, and the key is that address lower-cased)."""
        return self.email.lower()


class CodeState(Enum):
    ACTIVE = "ACTIVE"
    EXPIRED = "EXPIRED"
    REVOKED = "REVOKED"
    EXHAUSTED = "EXHAUSTED"


@dataclass(frozen=True, slots=True)
class ReferralCode:
    id: int
    code: str
    owner_id: int
    create_time: datetime
    expire_time: datetime
    revoke_time: datetime | None
    max_uses: int
    use_count: int

    def state(self, now: datetime) -> CodeState:
        """Computed at read time, in order of precedence: revoked, expired, exhausted."""
        if self.revoke_time is not None:
            return CodeState.REVOKED
        if self.expire_time <= now:
            return CodeState.EXPIRED
        if self.max_uses and self.use_count >= self.max_uses:
            return CodeState.EXHAUSTED
        return CodeState.ACTIVE


@dataclass(frozen=True, slots=True)
class PublicCode:
    """What anyone may learn of a live code from its owner's email: what a referee needs to
    use it (the code and until when), nothing about its owner or its use."""

    code: str
    expire_time: datetime

    @classmethod
    def of(cls, code: ReferralCode) -> PublicCode:
        return cls(code=code.code, expire_time=code.expire_time)

    def state(self, now: datetime) -> CodeState:
        """ACTIVE until it expires (only live codes are made public)."""
        return CodeState.ACTIVE if self.expire_time > now else CodeState.EXPIRED


class ReferralState(StrEnum):
    """Where a referral stands (issue 17): registered with a code, qualified by the referee's
    conversions, rewarded, or rejected by a review."""

    PENDING = "pending"
    QUALIFIED = "qualified"
    REWARDED = "rewarded"
    REJECTED = "rejected"


class ReviewState(StrEnum):
    """The fraud hold of a referral: ``held`` until a reviewer decides."""

    HELD = "held"
    APPROVED = "approved"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class ReferralStatus:
    """The lifecycle of one referral (its state row)."""

    referee_id: int
    referrer_id: int
    state: ReferralState
    review: ReviewState | None
    signals: tuple[str, ...]
    review_note: str
    create_time: datetime
    update_time: datetime
    qualify_time: datetime | None = None
    reward_time: datetime | None = None
    review_time: datetime | None = None
    #: Whether the fraud screening ran (``signals`` then says what it found).
    screened: bool = False


@dataclass(frozen=True, slots=True)
class Referral:
    user_id: int
    email: str
    join_time: datetime
    code: str
    state: ReferralState = ReferralState.PENDING
    review: ReviewState | None = None
    signals: tuple[str, ...] = ()
    qualify_time: datetime | None = None
    reward_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class Money:
    """An amount of a currency (``google.type.Money``)."""

    currency: str
    units: int
    nanos: int = 0


@dataclass(frozen=True, slots=True)
class Conversion:
    """A qualifying event reported by a service (a purchase, an activation)."""

    id: int
    source: int
    event_id: str
    fingerprint: str
    user_id: int
    kind: str
    occur_time: datetime
    create_time: datetime
    value: Money | None = None
    reverse_time: datetime | None = None


class RewardRole(StrEnum):
    REFERRER = "referrer"
    REFEREE = "referee"


class RewardState(StrEnum):
    HELD = "held"
    AVAILABLE = "available"
    CANCELED = "canceled"
    CLAWED_BACK = "clawed_back"


#: Ledger entry kinds: a grant, and the two corrections of one.
GRANT = "grant"
CANCEL = "cancel"
CLAWBACK = "clawback"


@dataclass(frozen=True, slots=True)
class Reward:
    """A grant of the ledger with its correction, if any. Its state is computed when read:
    canceled or clawed back by a correction, else available once ``available_time`` passed."""

    id: int
    user_id: int
    referee_id: int
    role: RewardRole
    amount: int
    unit: str
    rule: str
    conversion_id: int | None
    create_time: datetime
    #: None: on hold with no end yet (never set for grants today).
    available_time: datetime | None
    correction: str | None = None
    correct_time: datetime | None = None

    def state(self, now: datetime) -> RewardState:
        if self.correction == CANCEL:
            return RewardState.CANCELED
        if self.correction == CLAWBACK:
            return RewardState.CLAWED_BACK
        if self.available_time is not None and self.available_time <= now:
            return RewardState.AVAILABLE
        return RewardState.HELD


@dataclass(frozen=True, slots=True)
class Balance:
    """One unit's totals of a user's rewards, at the time of the read."""

    unit: str
    available: int = 0
    held: int = 0
    canceled: int = 0
    clawed_back: int = 0


@dataclass(frozen=True, slots=True)
class ReferralPage:
    referrals: list[Referral]
    next_page_token: str
    total_size: int


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int
    token_type: str = "Bearer"


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Where a login or refresh came from, as recorded with its session."""

    #: The client's IP address ("" when unknown).
    address: str = ""
    #: Its ``user-agent``, cut to 256 characters ("" when none).
    user_agent: str = ""


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller, as proven by a verified access token: a user (``user_id``,
    ``session_id``) or a service account (``service_account_id``, ``client_id``, ``scopes``;
    ``user_id`` 0)."""

    user_id: int
    token_id: str
    session_id: str
    expire_time: datetime
    service_account_id: int = 0
    client_id: str = ""
    service_name: str = ""
    scopes: frozenset[str] = frozenset()

    @property
    def is_service(self) -> bool:
        return self.service_account_id != 0


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """An internal service allowed to call with scopes (OAuth 2.0 client credentials)."""

    id: int
    name: str
    client_id: str
    secret_hash: str
    scopes: tuple[str, ...]
    create_time: datetime
    revoke_time: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoke_time is None


@dataclass(frozen=True, slots=True)
class ServiceToken:
    access_token: str
    expires_in: int
    scopes: tuple[str, ...]
    token_type: str = "Bearer"


@dataclass(frozen=True, slots=True)
class Introspection:
    """What a token is (RFC 7662); ``active`` False and nothing else for any dead token."""

    active: bool
    token_type: str = ""  # "access_token", "refresh_token" or "service_token"
    user_id: int = 0
    client_id: str = ""
    scopes: tuple[str, ...] = ()
    expire_time: datetime | None = None
    issue_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event to append to the outbox (``uow.events.append``), in the transaction of the
    change it describes. ``data`` holds the payload message's fields by their proto names
    (JSON-compatible values: ints, strings, bools, RFC 3339 times)."""

    type: str
    data: Mapping[str, Any]
    #: Unique id, for consumers to de-duplicate on.
    id: str = field(default_factory=lambda: f"evt_{secrets.token_hex(12)}")


@dataclass(frozen=True, slots=True)
class Event:
    """A committed event."""

    id: str
    cursor: int
    type: str
    time: datetime
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """Where events are POSTed (its secret is never part of it)."""

    id: int
    url: str
    #: Empty: every type.
    event_types: tuple[str, ...]
    description: str
    consecutive_failures: int
    create_time: datetime
    update_time: datetime
    disabled_time: datetime | None = None
    #: ``failures`` or ``operator``; "" when enabled.
    disabled_reason: str = ""


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    time: datetime
    #: 0 when there was no HTTP answer.
    http_status: int
    latency_ms: int
    error: str = ""


#: ``WebhookDelivery.state`` values.
DELIVERY_PENDING = "pending"
DELIVERY_SUCCEEDED = "succeeded"
DELIVERY_FAILED = "failed"


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    id: int
    endpoint_id: int
    event_id: str
    event_type: str
    state: str
    attempt_count: int
    next_attempt_time: datetime | None
    create_time: datetime
    attempts: tuple[WebhookAttempt, ...] = ()


@dataclass(frozen=True, slots=True)
class DueDelivery:
    """A claimed delivery: what to send, where, signed with what."""

    id: int
    endpoint_id: int
    url: str
    secret: str
    event_id: str
    body: str
    #: Attempts made before this one.
    attempt_count: int
