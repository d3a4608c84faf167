"""Auth use cases: register, log in, refresh, log out, who-am-I, and token authentication."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from referral_service.domain import events, idempotency
from referral_service.domain import validation as v
from referral_service.domain.accounts import new_message_id
from referral_service.domain.clock import utcnow
from referral_service.domain.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    Unauthenticated,
    check,
)
from referral_service.domain.models import (
    ClientInfo,
    CodeState,
    Introspection,
    Principal,
    ReferralCode,
    TokenPair,
    User,
)
from referral_service.domain.ports import (
    ACCESS_TOKEN,
    EMAIL_TAKEN,
    MAX_TOKEN_LENGTH,
    PASSWORD_CHANGED,
    REFRESH_TOKEN,
    REVOKED_BY_LIMIT,
    REVOKED_BY_LOGOUT,
    REVOKED_BY_OPERATOR,
    REVOKED_BY_PASSWORD_CHANGE,
    REVOKED_BY_REUSE,
    SERVICE_TOKEN,
    VERIFY_EMAIL,
    Conflict,
    NewUser,
    PasswordHasher,
    SessionRecord,
    Store,
    TokenCodec,
    UnitOfWork,
    Verification,
    VerifiedServiceToken,
    VerifiedToken,
)
from referral_service.domain.revocations import Revocations
from referral_service.domain.service_accounts import SESSIONS_REVOKE, account_revocation
from referral_service.domain.verification import EmailVerification

log = logging.getLogger("referral_service.auth")
_NO_CLIENT = ClientInfo()

#: Called with the owner's email key after a commit that changed their code (its use_count).
CodeChanged = Callable[[str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RegisterCommand:
    email: str
    password: str
    referral_code: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class _Claimed:
    code_id: int
    referrer_id: int
    referrer_email_key: str


def _token_length(field: str, token: str) -> list[FieldViolation]:
    if len(token) > MAX_TOKEN_LENGTH:
        return [FieldViolation(field, f"must be at most {MAX_TOKEN_LENGTH} characters", "TOO_LONG")]
    return []


def _email_taken() -> AlreadyExists:
    return AlreadyExists(
        Reason.EMAIL_ALREADY_REGISTERED,
        "an account with this email already exists",
        violations=[FieldViolation("email", "is already registered", "ALREADY_EXISTS")],
    )


_CODE_REFUSALS = {
    CodeState.REVOKED: (Reason.REFERRAL_CODE_REVOKED, "the referral code was withdrawn by its owner"),
    CodeState.EXPIRED: (Reason.REFERRAL_CODE_EXPIRED, "the referral code has expired"),
    CodeState.EXHAUSTED: (Reason.REFERRAL_CODE_EXHAUSTED, "the referral code has been used up"),
}


_MAX_SESSION_PAGE = 100
#: Session ids are what the token's ``sid`` claim may be: visible ASCII, at most 64 characters.
_SESSION_ID = re.compile(r"[!-~]{1,64}")


def _encode_page_token(session_id: str) -> str:
    return base64.urlsafe_b64encode(session_id.encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def owner_view(user: User) -> User:
    """The user as shown to anyone: enrichment data about an address only once its owner has
    proved it (until then whoever registered it could read a stranger's profile)."""
    if user.profile is not None and not user.is_verified:
        return dataclasses.replace(user, profile=None)
    return user


class AuthService:
    def __init__(
        self,
        store: Store,
        hasher: PasswordHasher,
        tokens: TokenCodec,
        revocations: Revocations,
        *,
        request_id_ttl: timedelta,
        on_code_used: CodeChanged | None = None,
        verification: EmailVerification | None = None,
        on_mail_queued: Callable[[], None] | None = None,
        disposable_domains: v.DisposableDomains | None = None,
        max_sessions_per_user: int = 20,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._hasher = hasher
        self._tokens = tokens
        self._revocations = revocations
        self._request_id_ttl = request_id_ttl
        self._on_code_used = on_code_used
        #: Email verification at registration; None when off.
        self._verification = verification
        #: Wakes the mail worker (the verification message is queued with the user).
        self._on_mail_queued = on_mail_queued
        self._disposable = disposable_domains
        self._max_sessions = max_sessions_per_user
        self._now = clock

    # --- register ----------------------------------------------------------------------------

    async def register(self, cmd: RegisterCommand) -> User:
        email, password, code_key = self._validate_registration(cmd)
        fingerprint = idempotency.fingerprint(email.key, code_key)
        if cmd.request_id:
            earlier = await self._replay(cmd.request_id, fingerprint)
            if earlier is not None:
                return earlier

        verification: Verification | None = None
        if self._verification is not None:
            password_hash, verification = await self._hash_and_verify(password, email)
        else:
            password_hash = await self._hasher.hash(password)
        now = self._now()
        new_user = NewUser(
            email=email.display,
            email_key=email.key,
            password_hash=password_hash,
            email_verification=verification.status.value if verification else None,
            email_verify_time=verification.checked_time if verification else None,
        )

        async def work(uow: UnitOfWork) -> tuple[User, _Claimed | None]:
            claimed = await self._claim_code(uow, code_key, email.key, now) if code_key else None
            if claimed is not None:
                user = await uow.users.add(
                    dataclasses.replace(
                        new_user, referrer_id=claimed.referrer_id, referral_code_id=claimed.code_id
                    ),
                    now,
                )
                await uow.users.count_referral(claimed.referrer_id)
            else:
                user = await uow.users.add(new_user, now)
            await uow.mails.enqueue(
                VERIFY_EMAIL, user_id=user.id, email_key=email.key, message_id=new_message_id(), now=now
            )
            await uow.events.append(events.user_registered(user), now)
            if claimed is not None:
                await uow.events.append(
                    events.referral_created(user.id, claimed.referrer_id, claimed.code_id), now
                )
            if cmd.request_id:
                await uow.requests.remember(
                    scope="register",
                    request_id=cmd.request_id,
                    fingerprint=fingerprint,
                    resource_id=user.id,
                    now=now,
                    expire_time=now + self._request_id_ttl,
                )
            return user, claimed

        try:
            user, claimed = await self._store.transact(work)
        except Conflict as conflict:
            if cmd.request_id:  # a concurrent request with the same request_id won: its result
                earlier = await self._replay(cmd.request_id, fingerprint)
                if earlier is not None:
                    return earlier
                raise _email_taken() from None
            if conflict.constraint == EMAIL_TAKEN:
                raise _email_taken() from None
            raise
        if claimed is not None and self._on_code_used is not None:
            await self._on_code_used(claimed.referrer_email_key)
        if self._on_mail_queued is not None:
            self._on_mail_queued()
        log.info("user registered", extra={"user_id": user.id, "referrer_id": user.referrer_id})
        return user

    def _validate_registration(self, cmd: RegisterCommand) -> tuple[v.Email, str, str]:
        """The parsed email, the normalised password and the code key ("" without a code), or
        one INVALID_ARGUMENT naming every bad field."""
        parsed = v.parse_email(cmd.email)
        violations: list[FieldViolation] = []
        email: v.Email | None = None
        if isinstance(parsed, FieldViolation):
            violations.append(parsed)
        else:
            email = parsed
        password = v.normalize_password(cmd.password)
        violations += v.password_violations(password, email)
        code_key = ""
        if cmd.referral_code:
            code_violation = v.code_violation(cmd.referral_code.strip(), "referral_code")
            if code_violation is not None:
                violations.append(code_violation)
            code_key = v.code_key(cmd.referral_code)
        request_violation = v.request_id_violation(cmd.request_id)
        if request_violation is not None:
            violations.append(request_violation)
        check(violations)
        assert email is not None
        if self._disposable is not None:
            disposable = v.disposable_violation(email, self._disposable)
            if disposable is not None:
                raise InvalidArgument(
                    Reason.EMAIL_DISPOSABLE,
                    "disposable email addresses cannot register; use a permanent address",
                    violations=[disposable],
                )
        return email, password, code_key

    async def _hash_and_verify(self, password: str, email: v.Email) -> tuple[str, Verification]:
        """Verify the email with the provider while the password hashes on the pool: the slower
        of the two sets the pace, not their sum. No transaction is open meanwhile (SQLite has a
        single writer; nothing may wait on a remote service while holding it)."""
        assert self._verification is not None
        # A duplicate email would be refused by the insert anyway; asking first (a cheap read)
        # keeps it from spending a provider credit.
        async with self._store.read() as uow:
            taken = await uow.users.by_email_key(email.key) is not None
        if taken:
            raise _email_taken()
        hashing = asyncio.ensure_future(self._hasher.hash(password))
        try:
            verification = await self._verification.check(email)
        except BaseException:
            hashing.cancel()
            await asyncio.gather(hashing, return_exceptions=True)
            raise
        return await hashing, verification

    async def _claim_code(
        self, uow: UnitOfWork, code_key: str, new_email_key: str, now: datetime
    ) -> _Claimed:
        """Count one use of a live code, or refuse. The caller is anonymous, so each answer may
        depend only on what anyone can learn anyway:

        1. UNKNOWN: no code has this string. Any user learns as much by asking for the code
           (CreateReferralCode says it is taken), and guessing is rate-limited per address.
        2. REVOKED / EXPIRED / EXHAUSTED: the code's liveness, the same answer whoever
           registers; it is what a referee holding the code needs, and reveals nothing about
           the owner. A dead code never reaches the owner check, so no answer says whether an
           address owned a deleted or expired code.
        3. SELF_REFERRAL: only for a live code. It says that the new address reaches the
           mailbox of the code's owner: for the owner's own address GetReferralCodeByEmail
           tells anyone the same (it returns that live code), and an alias (``+tag``, Gmail
           dots) names that same mailbox. Nothing about dead codes or other accounts.

        The owner check compares mailboxes (``canonical_mailbox``: ``+tag``, Gmail dots), so an
        alias of the owner's own mailbox does not count as a referral.
        """
        code = await uow.codes.by_key(code_key)
        if code is None:
            raise InvalidArgument(
                Reason.REFERRAL_CODE_UNKNOWN,
                "the referral code does not exist",
                violations=[FieldViolation("referral_code", "does not exist", "UNKNOWN")],
            )
        if code.state(now) is not CodeState.ACTIVE:
            raise self._refusal(code, now)
        owner = await uow.users.get(code.owner_id)
        assert owner is not None
        if v.canonical_mailbox(owner.email_key) == v.canonical_mailbox(new_email_key):
            raise InvalidArgument(
                Reason.SELF_REFERRAL,
                "you cannot register with your own referral code",
                violations=[FieldViolation("referral_code", "is your own code", "SELF_REFERRAL")],
            )
        if not await uow.codes.claim_use(code.id, now):  # it stopped being live meanwhile
            raise self._refusal(await uow.codes.get(code.id) or code, now)
        return _Claimed(code.id, owner.id, owner.email_key)

    @staticmethod
    def _refusal(code: ReferralCode, now: datetime) -> FailedPrecondition:
        reason, message = _CODE_REFUSALS.get(
            code.state(now), (Reason.REFERRAL_CODE_REVOKED, "the referral code is no longer valid")
        )
        return FailedPrecondition(reason, message, metadata={"code": code.code})

    async def _replay(self, request_id: str, fingerprint: str) -> User | None:
        async def load(uow: UnitOfWork, user_id: int) -> User:
            user = await uow.users.get(user_id)
            assert user is not None
            return user

        async with self._store.read() as uow:
            return await idempotency.replay(uow, "register", request_id, fingerprint, self._now(), load)

    async def create_superuser(
        self, email_raw: str, password_raw: str, *, promote_existing: bool = False
    ) -> tuple[User, bool]:
        """Create a superuser; returns it and True. An account with that email already
        existing is refused (ALREADY_EXISTS), unless ``promote_existing``: then it becomes a
        superuser with the given password, every one of its sessions is revoked (whoever
        registered the address first is logged out), and this returns it and False."""
        email = v.parse_email(email_raw)
        if isinstance(email, FieldViolation):
            raise InvalidArgument.fields(email)
        password = v.normalize_password(password_raw)
        check(v.password_violations(password, email))
        password_hash = await self._hasher.hash(password)
        now = self._now()
        if promote_existing:

            async def promote(uow: UnitOfWork) -> tuple[User, list[tuple[str, datetime]]] | None:
                existing = await uow.users.by_email_key(email.key)
                if existing is None:
                    return None
                await uow.users.set_password_hash(existing.id, password_hash, now)
                user = await uow.users.make_superuser(existing.id, now)
                assert user is not None
                return user, await self._end_user_sessions(uow, user.id, now, REVOKED_BY_OPERATOR)

            promoted = await self._store.transact(promote)
            if promoted is not None:
                user, entries = promoted
                await self._revocations.publish(entries, now)
                log.warning(
                    "existing account promoted to superuser; its password was replaced and its "
                    "sessions revoked",
                    extra={"user_id": user.id, "sessions_revoked": len(entries)},
                )
                return user, False
        new_user = NewUser(
            email=email.display,
            email_key=email.key,
            password_hash=password_hash,
            is_superuser=True,
        )
        try:

            async def add(uow: UnitOfWork) -> User:
                user = await uow.users.add(new_user, now)
                await uow.events.append(events.user_registered(user), now)
                return user

            user = await self._store.transact(add)
        except Conflict:
            raise AlreadyExists(
                Reason.EMAIL_ALREADY_REGISTERED,
                "an account with this email already exists; it was not changed (to make it a "
                "superuser with this password and end its sessions, use --promote-existing)",
                violations=[FieldViolation("email", "is already registered", "ALREADY_EXISTS")],
            ) from None
        return user, True

    # --- tokens ------------------------------------------------------------------------------

    async def login(self, email_raw: str, password_raw: str, client: ClientInfo = _NO_CLIENT) -> TokenPair:
        violations: list[FieldViolation] = []
        if not email_raw.strip():
            violations.append(FieldViolation("email", "is required", "REQUIRED"))
        elif len(email_raw) > v.EMAIL_MAX * 2:  # no account can have it; leading spaces are trimmed
            violations.append(
                FieldViolation("email", f"must be at most {v.EMAIL_MAX} characters", "TOO_LONG")
            )
        if not password_raw:
            violations.append(FieldViolation("password", "is required", "REQUIRED"))
        elif len(password_raw) > v.PASSWORD_MAX * 4:
            violations.append(FieldViolation("password", "is too long", "TOO_LONG"))
        check(violations)
        key = v.email_key(email_raw)
        password = v.normalize_password(password_raw)
        account = None
        if key is not None:
            async with self._store.read() as uow:
                account = await uow.users.credentials(key)
        # argon2 runs in its pool; an unknown email is checked against a dummy hash (same time).
        result = await self._hasher.verify(account.password_hash if account else None, password)
        if account is None or not result.ok:
            raise Unauthenticated(Reason.INVALID_CREDENTIALS, "the email or password is incorrect")
        if not account.is_active:
            raise PermissionDenied(Reason.ACCOUNT_DISABLED, "this account is disabled")
        now = self._now()
        session_id = uuid.uuid4().hex
        user_id = account.user_id

        access = self._tokens.issue_access(user_id, session_id, now)
        refresh = self._tokens.issue_refresh(user_id, session_id, now)

        async def work(uow: UnitOfWork) -> list[tuple[str, datetime]]:
            if result.new_hash is not None:
                await uow.users.set_password_hash(user_id, result.new_hash, now)
            # At most max_sessions live sessions: this login ends the oldest beyond it.
            live = await uow.sessions.live(user_id, now)
            surplus = [record.id for record in live[: max(0, len(live) + 1 - self._max_sessions)]]
            await uow.sessions.add(
                session_id=session_id,
                user_id=user_id,
                refresh_jti=refresh.jti,
                now=now,
                expire_time=refresh.expire_time,
                client=client,
            )
            return await self._end_sessions(uow, surplus, now, REVOKED_BY_LIMIT)

        ended = await self._store.transact(work)
        if ended:
            await self._revocations.publish(ended, now)
            log.info("oldest sessions ended", extra={"user_id": user_id, "sessions_revoked": len(ended)})
        log.info("login", extra={"user_id": user_id})
        return self._pair(access.token, refresh.token)

    def _pair(self, access_token: str, refresh_token: str) -> TokenPair:
        return TokenPair(
            access_token=access_token,
            expires_in=int(self._tokens.access_ttl.total_seconds()),
            refresh_token=refresh_token,
            refresh_expires_in=int(self._tokens.refresh_ttl.total_seconds()),
        )

    async def _end_sessions(
        self, uow: UnitOfWork, session_ids: list[str], now: datetime, reason: str
    ) -> list[tuple[str, datetime]]:
        """In the caller's transaction: revoke the sessions (their rows: no refresh succeeds
        after the commit) and record a revocation entry for each, which blocks the session's
        access tokens until the last one issued before now has expired (plus a minute for clock
        skew between hosts). The entries, for ``Revocations.publish`` after the commit."""
        if not session_ids:
            return []
        until = now + self._tokens.access_ttl + timedelta(minutes=1)
        entries = [(f"sid:{sid}", until) for sid in dict.fromkeys(session_ids)]
        await uow.sessions.revoke(session_ids, now, reason)
        await self._revocations.record(uow, entries)
        return entries

    async def _end_user_sessions(
        self, uow: UnitOfWork, user_id: int, now: datetime, reason: str, *, keep: str = ""
    ) -> list[tuple[str, datetime]]:
        """``_end_sessions`` for every live session of the user but ``keep``."""
        live = [session.id for session in await uow.sessions.live(user_id, now) if session.id != keep]
        return await self._end_sessions(uow, live, now, reason)

    async def refresh(self, refresh_token: str, client: ClientInfo = _NO_CLIENT) -> TokenPair:
        if not refresh_token:
            raise InvalidArgument.fields(FieldViolation("refresh_token", "is required", "REQUIRED"))
        check(_token_length("refresh_token", refresh_token))
        token = self._tokens.verify_refresh(refresh_token)
        now = self._now()
        access = self._tokens.issue_access(token.user_id, token.session_id, now)
        refresh = self._tokens.issue_refresh(token.user_id, token.session_id, now)

        async def rotate(uow: UnitOfWork) -> bool | SessionRecord | list[tuple[str, datetime]] | None:
            """True when rotated; else what is known of the session (None: not known), or for
            a reuse, the entries of the session revoked in this same transaction."""
            rotated = await uow.sessions.rotate(
                session_id=token.session_id,
                user_id=token.user_id,
                refresh_jti=token.jti,
                new_jti=refresh.jti,
                now=now,
                expire_time=refresh.expire_time,
                client=client,
            )
            if rotated:
                user = await uow.users.get(token.user_id)
                if user is None or not user.is_active:
                    raise PermissionDenied(Reason.ACCOUNT_DISABLED, "this account is disabled")
                return True
            session = await uow.sessions.get(token.session_id)
            if session is None or session.user_id != token.user_id or not session.live(now):
                return session
            # A live session whose current token is another one: this token was already used
            # (it may have been stolen). Revoke the session (every refresh token and, for their
            # remaining lifetime, every access token of it) in this same transaction.
            return await self._end_sessions(uow, [session.id], now, REVOKED_BY_REUSE)

        outcome = await self._store.transact(rotate)
        if outcome is True:
            return self._pair(access.token, refresh.token)
        if isinstance(outcome, list):
            await self._revocations.publish(outcome, now)
            log.warning("refresh token reuse; session revoked", extra={"user_id": token.user_id})
            raise Unauthenticated(
                Reason.REFRESH_TOKEN_REUSED,
                "this refresh token was already used; the session has been revoked, log in again",
            )
        if not isinstance(outcome, SessionRecord) or outcome.user_id != token.user_id:
            raise Unauthenticated(Reason.TOKEN_INVALID, "the refresh token is not recognised")
        if outcome.revoke_time is not None:
            raise Unauthenticated(Reason.TOKEN_REVOKED, "the refresh token has been revoked")
        raise Unauthenticated(Reason.TOKEN_EXPIRED, "the refresh token has expired")

    async def _revoke_sessions(
        self, session_ids: list[str], extra: list[tuple[str, datetime]], now: datetime, reason: str
    ) -> None:
        async def work(uow: UnitOfWork) -> list[tuple[str, datetime]]:
            await self._revocations.record(uow, extra)
            return await self._end_sessions(uow, list(dict.fromkeys(session_ids)), now, reason) + extra

        await self._revocations.publish(await self._store.transact(work), now)

    async def logout(self, principal: Principal, refresh_token: str) -> None:
        """Revoke the caller's session and access token, and the refresh token's session when
        one is given. The caller's own session ends first, whatever is wrong with the refresh
        token, which is reported afterwards."""
        now = self._now()
        own = [(f"jti:{principal.token_id}", principal.expire_time)]
        problem: DomainError | None = None
        sessions = [principal.session_id]
        if refresh_token:
            try:
                check(_token_length("refresh_token", refresh_token))
                token = self._tokens.verify_refresh(refresh_token)
                if token.user_id != principal.user_id:
                    raise PermissionDenied(
                        Reason.PERMISSION_DENIED,
                        "the refresh token belongs to another user; your own session was ended",
                    )
                sessions.append(token.session_id)
            except DomainError as error:
                problem = error
        await self._revoke_sessions(sessions, own, now, REVOKED_BY_LOGOUT)
        if problem is not None:
            raise problem

    # --- sessions ----------------------------------------------------------------------------

    async def list_sessions(
        self, principal: Principal, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[SessionRecord], str]:
        """A page of the caller's live sessions, oldest first, and the next page's token ("" at
        the end). The list is bounded by ``max_sessions_per_user``, so it is read whole."""
        violations = []
        if page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative", "NEGATIVE"))
        if len(page_token) > 128:
            violations.append(FieldViolation("page_token", "is too long", "TOO_LONG"))
        check(violations)
        async with self._store.read() as uow:
            sessions = await uow.sessions.live(principal.user_id, self._now())
        start = 0
        if page_token:
            after = _decode_page_token(page_token)
            ids = [session.id for session in sessions]
            if after is None or after not in ids:
                raise InvalidArgument(
                    Reason.INVALID_PAGE_TOKEN,
                    "the page_token is malformed, or its session has ended since",
                    violations=[FieldViolation("page_token", "is not valid", "INVALID")],
                )
            start = ids.index(after) + 1
        size = min(page_size or _MAX_SESSION_PAGE, _MAX_SESSION_PAGE)
        page = sessions[start : start + size]
        more = start + size < len(sessions)
        return page, _encode_page_token(page[-1].id) if more and page else ""

    async def revoke_session(self, principal: Principal, session_id: str) -> None:
        """End one of the caller's live sessions (their own current one too: a logout)."""
        if not _SESSION_ID.fullmatch(session_id):
            raise InvalidArgument.fields(
                FieldViolation("session_id", "must be a session id from ListSessions", "INVALID")
            )
        now = self._now()

        async def work(uow: UnitOfWork) -> list[tuple[str, datetime]] | None:
            session = await uow.sessions.get(session_id)
            if session is None or session.user_id != principal.user_id or not session.live(now):
                return None
            return await self._end_sessions(uow, [session_id], now, REVOKED_BY_LOGOUT)

        entries = await self._store.transact(work)
        if entries is None:
            # Another user's session is not told apart from none at all.
            raise NotFound(Reason.SESSION_NOT_FOUND, "you have no live session with this id")
        await self._revocations.publish(entries, now)

    async def revoke_user_sessions(
        self, user_id: int, *, keep: str = "", reason: str = REVOKED_BY_OPERATOR
    ) -> int:
        """End every live session of a user but ``keep``; how many were ended."""
        now = self._now()

        entries = await self._store.transact(
            lambda uow: self._end_user_sessions(uow, user_id, now, reason, keep=keep)
        )
        await self._revocations.publish(entries, now)
        return len(entries)

    async def revoke_any_users_sessions(self, caller: Principal, user_id: int) -> int:
        """For a superuser or a service with ``sessions:revoke``: end every session of a user."""
        if user_id <= 0:
            raise InvalidArgument.fields(FieldViolation("user_id", "must be a positive user id", "INVALID"))
        if SESSIONS_REVOKE not in caller.scopes:
            async with self._store.read() as uow:
                me = await uow.users.get(caller.user_id)
            if me is None or not me.is_superuser:
                raise PermissionDenied(
                    Reason.PERMISSION_DENIED, "only superusers and services with sessions:revoke may do this"
                )
        async with self._store.read() as uow:
            if await uow.users.get(user_id) is None:
                raise NotFound(Reason.USER_NOT_FOUND, "no user with this id")
        ended = await self.revoke_user_sessions(user_id)
        log.warning("all sessions of a user revoked", extra={"user_id": user_id, "sessions_revoked": ended})
        return ended

    async def change_password(self, principal: Principal, current_raw: str, new_raw: str) -> int:
        """Set a new password, given the current one; revoke every other session of the user
        (the caller's stays). Returns how many were revoked."""
        violations: list[FieldViolation] = []
        if not current_raw:
            violations.append(FieldViolation("current_password", "is required", "REQUIRED"))
        elif len(current_raw) > v.PASSWORD_MAX * 4:
            violations.append(FieldViolation("current_password", "is too long", "TOO_LONG"))
        user = await self.current_user(principal)
        email = v.parse_email(user.email)
        new_password = v.normalize_password(new_raw)
        own = None if isinstance(email, FieldViolation) else email
        violations += v.password_violations(new_password, own, field="new_password")
        check(violations)
        async with self._store.read() as uow:
            account = await uow.users.credentials(user.email_key)
        current = v.normalize_password(current_raw)
        result = await self._hasher.verify(account.password_hash if account else None, current)
        if account is None or not result.ok:
            raise Unauthenticated(Reason.INVALID_CREDENTIALS, "the current password is incorrect")
        new_hash = await self._hasher.hash(new_password)
        now = self._now()

        async def work(uow: UnitOfWork) -> list[tuple[str, datetime]]:
            await uow.users.set_password_hash(user.id, new_hash, now)
            await uow.mails.enqueue(
                PASSWORD_CHANGED,
                user_id=user.id,
                email_key=user.email_key,
                message_id=new_message_id(),
                now=now,
            )
            return await self._end_user_sessions(
                uow, user.id, now, REVOKED_BY_PASSWORD_CHANGE, keep=principal.session_id
            )

        entries = await self._store.transact(work)
        await self._revocations.publish(entries, now)
        if self._on_mail_queued is not None:
            self._on_mail_queued()
        log.warning("password changed", extra={"user_id": user.id, "sessions_revoked": len(entries)})
        return len(entries)

    async def authenticate(self, access_token: str) -> Principal:
        """The caller an access token or a service token names, unless it was revoked."""
        if self._tokens.kind_of(access_token) == SERVICE_TOKEN:
            service = await self._unrevoked_service(access_token)
            return Principal(
                user_id=0,
                token_id=service.jti,
                session_id="",
                expire_time=service.expire_time,
                service_account_id=service.account_id,
                client_id=service.client_id,
                service_name=service.name,
                scopes=frozenset(service.scopes),
            )
        token = await self._unrevoked_access(access_token)
        return Principal(
            user_id=token.user_id,
            token_id=token.jti,
            session_id=token.session_id,
            expire_time=token.expire_time,
        )

    async def _unrevoked_service(self, token: str) -> VerifiedServiceToken:
        service = self._tokens.verify_service(token)
        keys = [f"jti:{service.jti}", account_revocation(service.account_id)]
        if await self._revocations.is_revoked(keys, self._now()):
            raise Unauthenticated(Reason.TOKEN_REVOKED, "the service token has been revoked")
        return service

    async def _unrevoked_access(self, token: str) -> VerifiedToken:
        verified = self._tokens.verify_access(token)
        keys = [f"jti:{verified.jti}", f"sid:{verified.session_id}"]
        if await self._revocations.is_revoked(keys, self._now()):
            raise Unauthenticated(Reason.TOKEN_REVOKED, "the access token has been revoked")
        return verified

    async def introspect(self, token: str) -> Introspection:
        """RFC 7662: whether the token is active and what it is; any dead token (malformed,
        forged, expired, revoked, a used refresh token) is just inactive."""
        if not token:
            raise InvalidArgument.fields(FieldViolation("token", "is required", "REQUIRED"))
        check(_token_length("token", token))
        inactive = Introspection(active=False)
        kind = self._tokens.kind_of(token)
        now = self._now()
        try:
            if kind == SERVICE_TOKEN:
                service = await self._unrevoked_service(token)
                return Introspection(
                    active=True,
                    token_type=SERVICE_TOKEN,
                    client_id=service.client_id,
                    scopes=tuple(sorted(service.scopes)),
                    expire_time=service.expire_time,
                    issue_time=service.issue_time,
                )
            if kind == ACCESS_TOKEN:
                verified = await self._unrevoked_access(token)
            elif kind == REFRESH_TOKEN:
                verified = self._tokens.verify_refresh(token)
                async with self._store.read() as uow:
                    session = await uow.sessions.get(verified.session_id)
                if (
                    session is None
                    or session.user_id != verified.user_id
                    or session.refresh_jti != verified.jti
                    or not session.live(now)
                ):
                    return inactive
            else:
                return inactive
        except Unauthenticated:
            return inactive
        return Introspection(
            active=True,
            token_type=kind,
            user_id=verified.user_id,
            expire_time=verified.expire_time,
            issue_time=verified.issue_time,
        )

    async def get_user(self, user_id: int, email: str) -> User:
        """A user by id or by email (exactly one), for services."""
        if bool(user_id) == bool(email):
            raise InvalidArgument.fields(
                FieldViolation("user_id", "set exactly one of user_id and email", "ONE_OF"),
                FieldViolation("email", "set exactly one of user_id and email", "ONE_OF"),
            )
        if user_id < 0:
            raise InvalidArgument.fields(FieldViolation("user_id", "must be positive", "OUT_OF_RANGE"))
        async with self._store.read() as uow:
            if user_id:
                user = await uow.users.get(user_id)
            else:
                key = v.email_key(email) if len(email) <= v.EMAIL_MAX * 2 else None
                user = await uow.users.by_email_key(key) if key is not None else None
        if user is None:
            raise NotFound(Reason.USER_NOT_FOUND, "no such user")
        return owner_view(user)

    def jwks(self) -> list[dict[str, str]]:
        """The public keys that verify our tokens (empty with a shared HMAC secret)."""
        return self._tokens.jwks()

    async def current_user(self, principal: Principal) -> User:
        async with self._store.read() as uow:
            user = await uow.users.get(principal.user_id)
        if user is None:
            raise NotFound(Reason.USER_NOT_FOUND, "the user of this token no longer exists")
        return owner_view(user)

    async def end_user_sessions_in(
        self, uow: UnitOfWork, user_id: int, now: datetime, reason: str
    ) -> list[tuple[str, datetime]]:
        """End every session of a user inside ``uow``; the revocations to publish after it."""
        return await self._end_user_sessions(uow, user_id, now, reason)

    async def publish_revocations(self, entries: list[tuple[str, datetime]], now: datetime) -> None:
        await self._revocations.publish(entries, now)
