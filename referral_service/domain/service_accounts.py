"""Service accounts: internal services calling with scopes (OAuth 2.0 client credentials).

An operator creates an account with scopes and hands its ``client_id`` and ``client_secret``
(shown once) to the service, which exchanges them for short-lived service tokens
(``issue_token``). Only a keyed hash of the secret is stored: HMAC-SHA256 under a server key,
compared in constant time (the secret has 256 bits of entropy, so a slow hash like argon2
would add cost and nothing else). Revoking an account refuses new tokens at once and, through
a revocation entry (``sa:<account id>``) shared like a logout's, ends its live tokens on every
worker and replica.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from referral_service.domain.clock import utcnow
from referral_service.domain.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Reason,
    Unauthenticated,
    check,
)
from referral_service.domain.models import Principal, ServiceAccount, ServiceToken
from referral_service.domain.ports import (
    SERVICE_ACCOUNT_TAKEN,
    Conflict,
    Store,
    TokenCodec,
    UnitOfWork,
)
from referral_service.domain.revocations import Revocations

log = logging.getLogger("referral_service.service_accounts")

#: The scopes, as the protos document them on ``(referral.v1.scope)``.
USERS_REGISTER = "users:register"
USERS_READ = "users:read"
REFERRALS_READ = "referrals:read"
TOKENS_INTROSPECT = "tokens:introspect"
SESSIONS_REVOKE = "sessions:revoke"
CONVERSIONS_WRITE = "conversions:write"
REWARDS_READ = "rewards:read"
REFERRALS_REVIEW = "referrals:review"
EVENTS_READ = "events:read"
WEBHOOKS_MANAGE = "webhooks:manage"
SCOPES = frozenset(
    {
        USERS_REGISTER,
        USERS_READ,
        REFERRALS_READ,
        TOKENS_INTROSPECT,
        SESSIONS_REVOKE,
        CONVERSIONS_WRITE,
        REWARDS_READ,
        REFERRALS_REVIEW,
        EVENTS_READ,
        WEBHOOKS_MANAGE,
    }
)

#: How long a certificate-mapped account is used before it is read again (scopes; a revocation
#: is seen at once through its revocation entry).
_ACCOUNT_CACHE = timedelta(seconds=10)
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_CLIENT_ID_MAX = 64
#: What ``create`` issues: ``svc_`` and 24 hex digits.
_CLIENT_ID = re.compile(r"svc_[0-9a-f]{24}")
_SECRET_MAX = 128


def account_revocation(account_id: int) -> str:
    """The revocation key that ends every token of a service account."""
    return f"sa:{account_id}"


def _invalid_client() -> Unauthenticated:
    return Unauthenticated(Reason.INVALID_CLIENT, "the client_id or client_secret is wrong")


class ServiceAccountService:
    def __init__(
        self,
        store: Store,
        tokens: TokenCodec,
        revocations: Revocations,
        secret_key: bytes,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._tokens = tokens
        self._revocations = revocations
        self._key = secret_key
        self._now = clock
        #: Certificate-mapped accounts by name, with when to read them again.
        self._by_name: dict[str, tuple[datetime, ServiceAccount | None]] = {}

    def _hash(self, secret: str) -> str:
        return hmac.new(self._key, secret.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def _scope_violations(field: str, scopes: Sequence[str], allowed: frozenset[str]) -> list[FieldViolation]:
        unknown = sorted(set(scopes) - allowed)
        if not unknown:
            return []
        known = " ".join(sorted(allowed)) or "none"
        return [
            FieldViolation(field, f"not allowed: {' '.join(unknown)} (allowed: {known})", "INVALID_SCOPE")
        ]

    async def create(self, name: str, scopes: Sequence[str]) -> tuple[ServiceAccount, str]:
        """A new account and its client secret (shown once: only its hash is kept)."""
        violations = []
        if not _NAME.fullmatch(name):
            violations.append(
                FieldViolation(
                    "name", "must be 1-64 lower-case letters, digits, '.', '_' or '-'", "INVALID_FORMAT"
                )
            )
        if not scopes:
            violations.append(FieldViolation("scopes", "at least one scope is required", "REQUIRED"))
        violations += self._scope_violations("scopes", scopes, SCOPES)
        check(violations)
        client_id = f"svc_{secrets.token_hex(12)}"
        secret = f"rss_{secrets.token_urlsafe(32)}"
        ordered = sorted(set(scopes))
        now = self._now()

        async def work(uow: UnitOfWork) -> ServiceAccount:
            return await uow.service_accounts.add(
                name=name, client_id=client_id, secret_hash=self._hash(secret), scopes=ordered, now=now
            )

        try:
            account = await self._store.transact(work)
        except Conflict as conflict:
            if conflict.constraint != SERVICE_ACCOUNT_TAKEN:
                raise
            raise AlreadyExists(
                Reason.VALIDATION_FAILED,
                f"a service account named {name!r} exists (names of revoked accounts stay taken)",
                violations=[FieldViolation("name", "is taken", "ALREADY_EXISTS")],
            ) from None
        log.warning("service account created", extra={"service_account": name, "scopes": " ".join(ordered)})
        return account, secret

    async def list(self) -> list[ServiceAccount]:
        async with self._store.read() as uow:
            return await uow.service_accounts.all()

    async def revoke(self, name: str) -> ServiceAccount:
        """Revoke the account: no new tokens, and its live ones end at once everywhere."""
        now = self._now()
        until = now + self._tokens.access_ttl + timedelta(minutes=1)

        async def work(uow: UnitOfWork) -> ServiceAccount | None:
            if not _NAME.fullmatch(name):  # no other string names an account
                return None
            account = await uow.service_accounts.by_name(name)
            if account is None:
                return None
            await uow.service_accounts.revoke(account.id, now)
            await self._revocations.record(uow, [(account_revocation(account.id), until)])
            return await uow.service_accounts.by_name(name)

        account = await self._store.transact(work)
        if account is None:
            raise NotFound(Reason.USER_NOT_FOUND, f"no service account named {name!r}")
        await self._revocations.publish([(account_revocation(account.id), until)], now)
        log.warning("service account revoked", extra={"service_account": name})
        return account

    async def principal(self, name: str) -> Principal:
        """The caller a client certificate mapped to the account ``name`` is: the account with
        all its scopes, while it is active (a revocation is seen at once, through the same
        revocation entry that ends its tokens; the account itself is read at most every few
        seconds)."""
        now = self._now()
        cached = self._by_name.get(name)
        if cached is None or cached[0] <= now:
            async with self._store.read() as uow:
                account = await uow.service_accounts.by_name(name)
            cached = (now + _ACCOUNT_CACHE, account)
            self._by_name[name] = cached
        account = cached[1]
        if (
            account is None
            or not account.active
            or await self._revocations.is_revoked([account_revocation(account.id)], now)
        ):
            raise Unauthenticated(
                Reason.INVALID_CLIENT,
                "the client certificate is mapped to a service account that does not exist or was revoked",
            )
        return Principal(
            user_id=0,
            token_id="",
            session_id="",
            expire_time=now + _ACCOUNT_CACHE,
            service_account_id=account.id,
            client_id=account.client_id,
            service_name=account.name,
            scopes=frozenset(account.scopes),
        )

    async def issue_token(self, client_id: str, client_secret: str, scopes: Sequence[str]) -> ServiceToken:
        violations = []
        if not client_id:
            violations.append(FieldViolation("client_id", "is required", "REQUIRED"))
        elif len(client_id) > _CLIENT_ID_MAX:
            violations.append(
                FieldViolation("client_id", f"must be at most {_CLIENT_ID_MAX} characters", "TOO_LONG")
            )
        if not client_secret:
            violations.append(FieldViolation("client_secret", "is required", "REQUIRED"))
        elif len(client_secret) > _SECRET_MAX:
            violations.append(
                FieldViolation("client_secret", f"must be at most {_SECRET_MAX} characters", "TOO_LONG")
            )
        if len(scopes) > len(SCOPES) * 2:
            violations.append(FieldViolation("scopes", "too many", "TOO_LONG"))
        check(violations)
        account = None
        if _CLIENT_ID.fullmatch(client_id):  # no other string can name an account
            async with self._store.read() as uow:
                account = await uow.service_accounts.by_client_id(client_id)
        # The secret is compared (in constant time) whether or not the account exists.
        presented = self._hash(client_secret)
        stored = account.secret_hash if account is not None else self._hash(secrets.token_urlsafe(32))
        if not hmac.compare_digest(presented, stored) or account is None or not account.active:
            raise _invalid_client()
        granted = set(account.scopes)
        wanted = list(dict.fromkeys(scopes)) or sorted(granted)
        not_granted = self._scope_violations("scopes", wanted, frozenset(granted))
        if not_granted:
            raise InvalidArgument(
                Reason.INVALID_SCOPE,
                "a requested scope is not granted to this service account",
                violations=not_granted,
            )
        ordered = sorted(wanted)
        issued = self._tokens.issue_service(account, ordered, self._now())
        log.info("service token issued", extra={"service_account": account.name})
        return ServiceToken(
            access_token=issued.token,
            expires_in=int(self._tokens.access_ttl.total_seconds()),
            scopes=tuple(ordered),
        )
