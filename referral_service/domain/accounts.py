"""Proof of email ownership and password reset: the flows that work through a message sent to
the account's address.

- Register queues a verification message in its own transaction (``AuthService``);
  ``resend_verification`` and ``request_password_reset`` queue one for an email, whoever owns
  it: the request does the same work (one insert into the mail queue) whether or not an
  account has the address, and the mail worker looks the account up afterwards. The answer
  and its timing tell nobody who has an account.
- The message is composed when it is sent (``MailWorker``): its link token (256 bits) and, for
  verification, a 6-digit code are created then, and only their hashes stored.
- A token works once and dies with any newer one of its purpose being used; a code dies after
  ``MAX_CODE_FAILURES`` wrong guesses (its link still works).
- ``is_verified`` is set only here: by a verification token or code, or by a password reset
  (the link proved the mailbox too). Enrichment is queued when an address becomes verified.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from referral_service.domain import events
from referral_service.domain import validation as v
from referral_service.domain.clock import utcnow
from referral_service.domain.errors import (
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Reason,
    check,
)
from referral_service.domain.models import User
from referral_service.domain.ports import (
    PASSWORD_CHANGED,
    PASSWORD_RESET,
    VERIFY_EMAIL,
    EmailToken,
    PasswordHasher,
    Store,
    UnitOfWork,
)

log = logging.getLogger("referral_service.accounts")

#: Wrong codes a verification code survives.
MAX_CODE_FAILURES = 5
CODE_DIGITS = 6
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
_CODE = re.compile(rf"[0-9]{{{CODE_DIGITS}}}")

#: Ends every session of a user inside a transaction; returns the revocation entries to publish.
EndSessions = Callable[[UnitOfWork, int, datetime, str], Awaitable[list[tuple[str, datetime]]]]
PublishRevocations = Callable[[list[tuple[str, datetime]], datetime], Awaitable[None]]
#: Called inside the transaction that verified a user (enrichment, referral qualification).
OnVerified = Callable[[UnitOfWork, User, datetime], Awaitable[None]]

REVOKED_BY_PASSWORD_RESET = "reset"


def new_link_token() -> str:
    return secrets.token_urlsafe(32)


def new_code() -> str:
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def new_message_id() -> str:
    """The local part of a Message-ID, fixed when a message is queued."""
    return uuid.uuid4().hex


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def code_hash(user_id: int, code: str) -> str:
    return hashlib.sha256(f"{user_id}:{code}".encode()).hexdigest()


def _invalid(field: str) -> InvalidArgument:
    return InvalidArgument(
        Reason.EMAIL_TOKEN_INVALID,
        "the token or code is not valid",
        violations=[FieldViolation(field, "is not valid", "INVALID")],
    )


def _expired(field: str) -> FailedPrecondition:
    return FailedPrecondition(
        Reason.EMAIL_TOKEN_EXPIRED,
        "the token has expired; ask for a new message",
        violations=[FieldViolation(field, "has expired", "EXPIRED")],
    )


def _used(field: str) -> FailedPrecondition:
    return FailedPrecondition(
        Reason.EMAIL_TOKEN_USED,
        "the token was used already",
        violations=[FieldViolation(field, "was used already", "USED")],
    )


@dataclass(frozen=True, slots=True)
class _Refused:
    """A refusal decided inside a transaction whose writes (failure counts) must commit."""

    error: DomainError


class AccountEmails:
    def __init__(
        self,
        store: Store,
        hasher: PasswordHasher,
        *,
        end_sessions: EndSessions,
        publish_revocations: PublishRevocations,
        on_mail_queued: Callable[[], None] | None = None,
        on_verified: list[OnVerified] | None = None,
        after_verified: list[Callable[[], None]] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._end_sessions = end_sessions
        self._publish = publish_revocations
        self._on_mail_queued = on_mail_queued
        self._on_verified = list(on_verified or ())
        self._after_verified = list(after_verified or ())
        self._now = clock

    def add_on_verified(self, hook: OnVerified, after_commit: Callable[[], None] | None = None) -> None:
        """Run ``hook`` in the transaction that verifies an address, and ``after_commit``
        once it has committed."""
        self._on_verified.append(hook)
        if after_commit is not None:
            self._after_verified.append(after_commit)

    def _verified(self) -> None:
        for callback in self._after_verified:
            callback()

    def _queued(self) -> None:
        if self._on_mail_queued is not None:
            self._on_mail_queued()

    # --- verification ------------------------------------------------------------------------

    async def verify_email(self, token: str, email: str, code: str) -> User:
        """Verify with the link's token, or with the email and the code."""
        if token and (email or code):
            raise InvalidArgument.fields(
                FieldViolation("token", "set either token, or email and code", "ONE_OF"),
            )
        if not token:
            violations = []
            if not email:
                violations.append(FieldViolation("email", "is required with code", "REQUIRED"))
            if not code:
                violations.append(FieldViolation("code", "is required (or token)", "REQUIRED"))
            check(violations)
        now = self._now()
        if token:
            outcome = await self._store.transact(lambda uow: self._verify_by_token(uow, token, now))
        else:
            outcome = await self._store.transact(lambda uow: self._verify_by_code(uow, email, code, now))
        if isinstance(outcome, _Refused):
            raise outcome.error
        self._verified()
        log.info("email verified", extra={"user_id": outcome.id})
        return outcome

    async def _use(self, uow: UnitOfWork, token: str, purpose: str, field: str, now: datetime) -> EmailToken:
        """Use up a link token of ``purpose`` or raise (nothing was written then)."""
        if not _TOKEN.fullmatch(token):
            raise _invalid(field)
        found = await uow.email_tokens.by_hash(token_hash(token))
        if found is None or found.purpose != purpose:
            raise _invalid(field)
        if found.use_time is not None:
            raise _used(field)
        if found.expire_time <= now:
            raise _expired(field)
        if not await uow.email_tokens.use(found.id, now):  # used by a concurrent call
            raise _used(field)
        return found

    async def _verify_by_token(self, uow: UnitOfWork, token: str, now: datetime) -> User | _Refused:
        found = await self._use(uow, token, VERIFY_EMAIL, "token", now)
        return await self._mark_verified(uow, found.user_id, now)

    async def _verify_by_code(self, uow: UnitOfWork, email: str, code: str, now: datetime) -> User | _Refused:
        key = v.email_key(email) if len(email) <= v.EMAIL_MAX * 2 else None
        user = await uow.users.by_email_key(key) if key is not None else None
        if user is None or not _CODE.fullmatch(code):
            return _Refused(_invalid("code"))
        live = [
            t
            for t in await uow.email_tokens.with_codes(user.id, VERIFY_EMAIL, now)
            if t.code_failures < MAX_CODE_FAILURES
        ]
        wanted = code_hash(user.id, code)
        match = next((t for t in live if t.code_hash and hmac.compare_digest(t.code_hash, wanted)), None)
        if match is None:
            await uow.email_tokens.count_code_failure([t.id for t in live])
            return _Refused(_invalid("code"))
        if not await uow.email_tokens.use(match.id, now):
            return _Refused(_used("code"))
        return await self._mark_verified(uow, user.id, now)

    async def _mark_verified(self, uow: UnitOfWork, user_id: int, now: datetime) -> User:
        await uow.email_tokens.use_all(user_id, VERIFY_EMAIL, now)
        changed = await uow.users.mark_verified(user_id, now)
        user = await uow.users.get(user_id)
        assert user is not None
        if changed:
            await uow.events.append(events.email_verified(user), now)
            for hook in self._on_verified:
                await hook(uow, user, now)
            user = await uow.users.get(user_id)
            assert user is not None
        return user

    async def resend_verification(self, email: str) -> None:
        await self._queue_for_email(VERIFY_EMAIL, email)

    # --- password reset ----------------------------------------------------------------------

    async def request_password_reset(self, email: str) -> None:
        await self._queue_for_email(PASSWORD_RESET, email)

    async def _queue_for_email(self, kind: str, email: str) -> None:
        """Queue a message for whoever has ``email`` (resolved by the mail worker)."""
        parsed = v.parse_email(email)
        if isinstance(parsed, FieldViolation):
            raise InvalidArgument.fields(parsed)
        now = self._now()
        await self._store.transact(
            lambda uow: uow.mails.enqueue(kind, email_key=parsed.key, message_id=new_message_id(), now=now)
        )
        self._queued()

    async def reset_password(self, token: str, new_password_raw: str) -> int:
        """Set a new password with a reset token; every session ends. Returns how many."""
        new_password = v.normalize_password(new_password_raw)
        if not new_password:
            check([FieldViolation("new_password", "is required", "REQUIRED")])
        if not token:
            check([FieldViolation("token", "is required", "REQUIRED")])
        now = self._now()
        # Check the token (without using it) first: the policy needs the account's email, and
        # hashing a password for a bad token would be wasted pool time.
        async with self._store.read() as uow:
            found = await uow.email_tokens.by_hash(token_hash(token)) if _TOKEN.fullmatch(token) else None
            user = await uow.users.get(found.user_id) if found is not None else None
        if found is None or user is None or not user.is_active or found.purpose != PASSWORD_RESET:
            raise _invalid("token")
        if found.use_time is not None:
            raise _used("token")
        if found.expire_time <= now:
            raise _expired("token")
        email = v.parse_email(user.email)
        own = None if isinstance(email, FieldViolation) else email
        check(v.password_violations(new_password, own, field="new_password"))
        new_hash = await self._hasher.hash(new_password)
        now = self._now()

        async def work(uow: UnitOfWork) -> list[tuple[str, datetime]]:
            used = await self._use(uow, token, PASSWORD_RESET, "token", now)
            await uow.email_tokens.use_all(used.user_id, PASSWORD_RESET, now)
            await uow.users.set_password_hash(used.user_id, new_hash, now)
            await self._mark_verified(uow, used.user_id, now)
            await uow.mails.enqueue(
                PASSWORD_CHANGED,
                user_id=used.user_id,
                email_key=user.email_key,
                message_id=new_message_id(),
                now=now,
            )
            return await self._end_sessions(uow, used.user_id, now, REVOKED_BY_PASSWORD_RESET)

        entries = await self._store.transact(work)
        await self._publish(entries, now)
        self._queued()
        self._verified()
        log.warning("password reset", extra={"user_id": user.id, "sessions_revoked": len(entries)})
        return len(entries)


@dataclass(frozen=True, slots=True)
class MailTokenPolicy:
    """How long the tokens of each purpose live, and where their links point (``{token}`` is
    replaced by the token)."""

    verify_ttl: timedelta
    reset_ttl: timedelta
    verify_link: str
    reset_link: str
