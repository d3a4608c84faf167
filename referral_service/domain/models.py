"""Domain values returned by use cases and turned into protos by the API layer."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum


@dataclass(frozen=True, slots=True)
class User:
    id: int
    email: str
    is_active: bool
    is_verified: bool
    is_superuser: bool
    referrer_id: int | None
    create_time: datetime


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
class Referral:
    user_id: int
    email: str
    join_time: datetime
    code: str


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
class Principal:
    """The authenticated caller, as proven by a verified access token."""

    user_id: int
    token_id: str
    session_id: str
    expire_time: datetime
