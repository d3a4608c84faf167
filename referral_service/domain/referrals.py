"""Referral use cases: create, read and delete one's code, look a code up by email (through the
cache), list referrals with keyset pagination."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from referral_service.domain import events, idempotency
from referral_service.domain import validation as v
from referral_service.domain.clock import utcnow
from referral_service.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    Unavailable,
    check,
)
from referral_service.domain.models import CodeState, PublicCode, ReferralCode, ReferralPage, ReferralState
from referral_service.domain.ports import (
    CODE_TAKEN,
    OPEN_CODE_EXISTS,
    Conflict,
    NewCode,
    Store,
    UnitOfWork,
    VersionedCache,
)
from referral_service.domain.service_accounts import REFERRALS_READ

log = logging.getLogger("referral_service.referrals")

#: Crockford-style alphabet without the look-alikes 0/O, 1/I/L and U.
CODE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
GENERATED_CODE_LENGTH = 10
MAX_USES_LIMIT = 1_000_000
_NOT_FOUND_BY_EMAIL = "no live referral code for this email"


@dataclass(frozen=True, slots=True)
class CreateCodeCommand:
    owner_id: int
    code: str = ""
    expire_time: datetime | None = None
    ttl: timedelta | None = None
    max_uses: int = 0
    request_id: str = ""


def generate_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(GENERATED_CODE_LENGTH))


def _cache_key(email_key: str) -> str:
    """The cached public look-up of an email (``public-``: its value is a ``PublicCode``, the
    format that replaced whole codes; a new name, so that no value of the old format is read)."""
    return f"public-code-by-email:{email_key}"


def code_by_email_cache_key(email_raw: str) -> str | None:
    """The cache key ``code_by_email(email_raw)`` will look up (None for an invalid email), so
    that the look-up can be started before the call's rate limit is taken."""
    parsed = v.parse_email(email_raw)
    return None if isinstance(parsed, FieldViolation) else _cache_key(parsed.key)


def _encode(code: PublicCode) -> bytes:
    """Only the public projection is cached: nothing in the cache is more than the look-up
    returns to anyone."""
    return json.dumps({"c": code.code, "et": code.expire_time.timestamp()}, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=4096)
def _decode(raw: bytes) -> PublicCode:
    """Memoised: a hot code's cached bytes are the same on every hit (the value is immutable)."""
    data = json.loads(raw)
    return PublicCode(code=data["c"], expire_time=datetime.fromtimestamp(data["et"], UTC))


class ReferralService:
    def __init__(
        self,
        store: Store,
        cache: VersionedCache,
        *,
        page_secret: bytes,
        max_horizon: timedelta,
        cache_ttl: timedelta,
        negative_cache_ttl: timedelta,
        default_page_size: int,
        max_page_size: int,
        request_id_ttl: timedelta,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._cache = cache
        self._now = clock
        self._page_key = hmac.new(page_secret, b"referral-service page tokens", hashlib.sha256).digest()
        self._max_horizon = max_horizon
        self._cache_ttl = cache_ttl
        self._negative_ttl = negative_cache_ttl
        self._default_page = default_page_size
        self._max_page = max_page_size
        self._request_id_ttl = request_id_ttl

    # --- create ------------------------------------------------------------------------------

    def _validate(self, cmd: CreateCodeCommand, now: datetime) -> datetime:
        violations: list[FieldViolation] = []
        if cmd.code:
            problem = v.code_violation(cmd.code)
            if problem is not None:
                violations.append(problem)
        expire: datetime | None = None
        if cmd.expire_time is not None and cmd.ttl is not None:
            violations.append(
                FieldViolation("expire_time", "give either expire_time or ttl, not both", "CONFLICT")
            )
        elif cmd.expire_time is not None:
            # Compare durations, never add to a datetime: any request value stays in range.
            ahead = cmd.expire_time - now
            if ahead <= timedelta(0):
                violations.append(FieldViolation("expire_time", "must lie in the future", "IN_PAST"))
            elif ahead > self._max_horizon:
                violations.append(self._too_far("expire_time"))
            else:
                expire = cmd.expire_time
        elif cmd.ttl is not None:
            # Checked against the horizon before the addition: a huge ttl would overflow it.
            if cmd.ttl <= timedelta(0):
                violations.append(FieldViolation("ttl", "must be positive", "NOT_POSITIVE"))
            elif cmd.ttl > self._max_horizon:
                violations.append(self._too_far("ttl"))
            else:
                expire = now + cmd.ttl
        else:
            violations.append(
                FieldViolation("expire_time", "an expiry is required: set expire_time or ttl", "REQUIRED")
            )
        if cmd.max_uses < 0:
            violations.append(
                FieldViolation("max_uses", "must not be negative (0 means unlimited)", "NEGATIVE")
            )
        elif cmd.max_uses > MAX_USES_LIMIT:
            violations.append(FieldViolation("max_uses", f"must be at most {MAX_USES_LIMIT}", "TOO_LARGE"))
        request_problem = v.request_id_violation(cmd.request_id)
        if request_problem is not None:
            violations.append(request_problem)
        check(violations)
        assert expire is not None
        return expire

    def _too_far(self, field: str) -> FieldViolation:
        days = self._max_horizon.total_seconds() / 86400
        return FieldViolation(field, f"must lie within {days:g} days from now", "TOO_FAR")

    async def create_code(self, cmd: CreateCodeCommand) -> ReferralCode:
        now = self._now()
        expire = self._validate(cmd, now)
        scope = f"code:{cmd.owner_id}"
        fingerprint = self._fingerprint(cmd)
        if cmd.request_id:
            earlier = await self._replay(scope, cmd.request_id, fingerprint)
            if earlier is not None:
                return earlier
        # Generated codes are 10 characters of a 30-letter alphabet (49 bits); a collision with
        # an earlier code is rare, and simply retried.
        for _attempt in range(5):
            code = cmd.code or generate_code()
            try:
                created, owner_key = await self._store.transact(
                    functools.partial(self._insert_code, cmd=cmd, code=code, now=now, expire=expire)
                )
            except Conflict as conflict:
                if cmd.request_id:
                    earlier = await self._replay(scope, cmd.request_id, fingerprint)
                    if earlier is not None:
                        return earlier
                if conflict.constraint == CODE_TAKEN and not cmd.code:
                    continue
                if conflict.constraint == CODE_TAKEN and await self._holds(cmd.owner_id, code):
                    raise self._conflict_error(Conflict(OPEN_CODE_EXISTS)) from None
                raise self._conflict_error(conflict) from None
            await self._cache.invalidate(_cache_key(owner_key))
            log.info("referral code created", extra={"user_id": cmd.owner_id})
            return created
        raise Unavailable(
            Reason.SERVICE_UNAVAILABLE,
            "could not generate a unique code; retry",
            retry_after_seconds=0.1,
        )

    async def _holds(self, owner_id: int, code: str) -> bool:
        """Whether the code is the owner's own (then it is their live code, or one a concurrent
        request of theirs just issued: either way, they have a live code)."""
        async with self._store.read() as uow:
            holder = await uow.codes.by_key(v.code_key(code))
        return holder is not None and holder.owner_id == owner_id

    @staticmethod
    def _conflict_error(conflict: Conflict) -> Exception:
        if conflict.constraint == CODE_TAKEN:
            return AlreadyExists(
                Reason.REFERRAL_CODE_TAKEN,
                "this referral code has already been issued; choose another",
                violations=[FieldViolation("code", "is already taken", "ALREADY_EXISTS")],
            )
        # The open-slot index, or a concurrent request with the same request_id that has
        # since been forgotten: either way the caller has a live code.
        return FailedPrecondition(
            Reason.REFERRAL_CODE_ALREADY_ACTIVE,
            "you already have a live referral code; delete it before creating another",
        )

    async def _insert_code(
        self, uow: UnitOfWork, cmd: CreateCodeCommand, code: str, now: datetime, expire: datetime
    ) -> tuple[ReferralCode, str]:
        """One transaction: free the slot of a dead code, insert, remember the request id.
        Unique violations surface as ``Conflict`` after the rollback."""
        owner = await uow.users.get(cmd.owner_id)
        if owner is None:
            raise NotFound(Reason.USER_NOT_FOUND, "the user of this token no longer exists")
        await uow.codes.close_dead(cmd.owner_id, now)
        if cmd.code:
            # The owner may issue their own vanity code again once it is no longer live; nobody
            # else ever gets it (the key stays on one of the owner's rows throughout). The new
            # code starts afresh (use_count 0, the new expiry and max_uses); the old row keeps
            # its referrals and counts as history.
            await uow.codes.reclaim(cmd.owner_id, v.code_key(code))
        created = await uow.codes.add(
            NewCode(
                code=code.upper(),
                code_key=v.code_key(code),
                owner_id=cmd.owner_id,
                expire_time=expire,
                max_uses=cmd.max_uses,
            ),
            now,
        )
        await uow.events.append(events.referral_code_created(created), now)
        if cmd.request_id:
            await uow.requests.remember(
                scope=f"code:{cmd.owner_id}",
                request_id=cmd.request_id,
                fingerprint=self._fingerprint(cmd),
                resource_id=created.id,
                now=now,
                expire_time=now + self._request_id_ttl,
            )
        return created, owner.email_key

    @staticmethod
    def _fingerprint(cmd: CreateCodeCommand) -> str:
        return idempotency.fingerprint(
            v.code_key(cmd.code), str(cmd.max_uses), str(cmd.expire_time), str(cmd.ttl)
        )

    async def _replay(self, scope: str, request_id: str, fingerprint: str) -> ReferralCode | None:
        async def load(uow: UnitOfWork, code_id: int) -> ReferralCode:
            code = await uow.codes.get(code_id)
            assert code is not None
            return code

        async with self._store.read() as uow:
            return await idempotency.replay(uow, scope, request_id, fingerprint, self._now(), load)

    # --- mine --------------------------------------------------------------------------------

    async def my_code(self, owner_id: int) -> ReferralCode:
        async with self._store.read() as uow:
            code = await uow.codes.open_code(owner_id)
        if code is None:
            raise NotFound(Reason.REFERRAL_CODE_NOT_FOUND, "you have no referral code")
        return code

    async def delete_code(self, owner_id: int) -> None:
        now = self._now()

        async def work(uow: UnitOfWork) -> str | None:
            revoked = await uow.codes.revoke_open(owner_id, now)
            if revoked is not None:
                await uow.events.append(events.referral_code_deleted(revoked), now)
            owner = await uow.users.get(owner_id)
            return owner.email_key if revoked is not None and owner is not None else None

        owner_key = await self._store.transact(work)
        if owner_key is None:
            raise NotFound(Reason.REFERRAL_CODE_NOT_FOUND, "you have no referral code")
        await self._cache.invalidate(_cache_key(owner_key))
        log.info("referral code deleted", extra={"user_id": owner_id})

    async def code_used(self, owner_email_key: str) -> None:
        """A registration used the owner's code (it may be used up now): drop the cached copy."""
        await self._cache.invalidate(_cache_key(owner_email_key))

    # --- lookup by email ---------------------------------------------------------------------

    async def code_by_email(self, email_raw: str) -> PublicCode:
        """The live code of the account with this email, as anyone may see it (``PublicCode``:
        the look-up is public). NOT_FOUND alike for an unknown email and for no live code."""
        parsed = v.parse_email(email_raw)
        if isinstance(parsed, FieldViolation):
            raise InvalidArgument.fields(parsed)
        key = _cache_key(parsed.key)
        found = await self._cache.lookup(key)
        now = self._now()
        if found.hit:
            if found.value:
                cached = _decode(found.value)
                if cached.state(now) is CodeState.ACTIVE:
                    return cached
            raise NotFound(Reason.REFERRAL_CODE_NOT_FOUND, _NOT_FOUND_BY_EMAIL)
        async with self._store.read() as uow:
            live = await uow.codes.live_by_email_key(parsed.key, now)
        public = PublicCode.of(live) if live is not None else None
        if found.stamp is not None:
            if public is None:
                await self._cache.fill(key, found.stamp, b"", self._negative_ttl.total_seconds())
            else:
                ttl = min(self._cache_ttl, public.expire_time - now).total_seconds()
                await self._cache.fill(key, found.stamp, _encode(public), ttl)
        if public is None:
            raise NotFound(Reason.REFERRAL_CODE_NOT_FOUND, _NOT_FOUND_BY_EMAIL)
        return public

    # --- referrals ---------------------------------------------------------------------------

    def _page_token(self, referrer_id: int, after_id: int) -> str:
        body = base64.urlsafe_b64encode(json.dumps([1, referrer_id, after_id]).encode()).rstrip(b"=")
        mac = base64.urlsafe_b64encode(hmac.new(self._page_key, body, hashlib.sha256).digest()[:12])
        return (body + b"." + mac).decode()

    def _read_page_token(self, token: str, referrer_id: int) -> int:
        bad = InvalidArgument(
            Reason.INVALID_PAGE_TOKEN,
            "page_token is invalid",
            violations=[FieldViolation("page_token", "is not a token this server issued", "INVALID")],
        )
        try:
            body, _, mac = token.encode("ascii").partition(b".")
            expected = base64.urlsafe_b64encode(hmac.new(self._page_key, body, hashlib.sha256).digest()[:12])
            if not hmac.compare_digest(mac, expected):
                raise bad
            version, token_referrer, after_id = json.loads(
                base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4))
            )
        except (ValueError, UnicodeError, TypeError):
            raise bad from None
        if version != 1 or not isinstance(after_id, int):
            raise bad
        if token_referrer != referrer_id:
            raise InvalidArgument(
                Reason.INVALID_PAGE_TOKEN,
                "page_token was issued for a different referrer_id",
                violations=[
                    FieldViolation("page_token", "belongs to a request with other parameters", "MISMATCH")
                ],
            )
        return after_id

    async def list_referrals(
        self,
        caller_id: int,
        referrer_id: int,
        page_size: int,
        page_token: str,
        *,
        caller_scopes: frozenset[str] = frozenset(),
        state: ReferralState | None = None,
    ) -> ReferralPage:
        """A page of the referrer's referrals: for the referrer, a superuser, or a service with
        ``referrals:read`` (``caller_scopes``; ``caller_id`` 0)."""
        violations: list[FieldViolation] = []
        if referrer_id <= 0:
            violations.append(FieldViolation("referrer_id", "must be a positive user id", "INVALID"))
        if page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative", "NEGATIVE"))
        if len(page_token) > 512:
            violations.append(FieldViolation("page_token", "is too long", "TOO_LONG"))
        check(violations)
        # Permission before existence: others' ids are not probed.
        if caller_id != referrer_id and REFERRALS_READ not in caller_scopes:
            async with self._store.read() as uow:
                caller = await uow.users.get(caller_id)
            if caller is None or not caller.is_superuser:
                raise PermissionDenied(Reason.PERMISSION_DENIED, "you may only list your own referrals")
        after_id = self._read_page_token(page_token, referrer_id) if page_token else 0
        size = min(page_size or self._default_page, self._max_page)
        async with self._store.read() as uow:
            total = await uow.referrals.count(referrer_id)
            if total is None:
                raise NotFound(Reason.USER_NOT_FOUND, "no user with this id")
            rows = await uow.referrals.page(referrer_id, after_id, size + 1, state)
        more = len(rows) > size
        rows = rows[:size]
        token = self._page_token(referrer_id, rows[-1].user_id) if more and rows else ""
        return ReferralPage(referrals=rows, next_page_token=token, total_size=total)
