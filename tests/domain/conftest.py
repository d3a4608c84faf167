"""The domain, wired on in-process ports: ``MemoryStore``, the fakes of ``fakes.py`` and a clock
the test moves. No server, no network, no argon2: each test takes milliseconds."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import pytest

from referral_service.crypto.jwt import JwtCodec, TokenConfig, hmac_key
from referral_service.domain.accounts import AccountEmails, MailTokenPolicy
from referral_service.domain.auth import AuthService, RegisterCommand
from referral_service.domain.enrichment import queue_lookup
from referral_service.domain.mail import MailWorker
from referral_service.domain.models import Principal, ReferralCode, TokenPair, User
from referral_service.domain.ports import OutgoingMail
from referral_service.domain.referrals import CreateCodeCommand, ReferralService
from referral_service.domain.revocations import Revocations
from referral_service.domain.validation import DisposableDomains
from referral_service.domain.verification import EmailVerification
from referral_service.memory.store import MemoryStore
from tests.domain.fakes import FakeCache, FakeClock, FakeRevocationCache, FakeVerifier, FastHasher

PASSWORD = "correct horse battery staple"
SECRET = b"domain-test-secret-" + b"x" * 32
REQUEST_ID_TTL = timedelta(hours=24)
ACCESS_TTL = timedelta(minutes=15)
DEFAULT_PAGE = 3
MAX_PAGE = 5
CACHE_TTL = timedelta(minutes=10)
NEGATIVE_CACHE_TTL = timedelta(seconds=30)
MAX_HORIZON = timedelta(days=365)


@dataclass
class Domain:
    """The use cases and the ports under them, for one test."""

    clock: FakeClock
    store: MemoryStore
    hasher: FastHasher
    tokens: JwtCodec
    cache: FakeCache
    revocation_cache: FakeRevocationCache
    revocations: Revocations
    referrals: ReferralService
    auth: AuthService
    accounts: AccountEmails
    mailer: FakeMailer
    mail: MailWorker
    codes_used: list[str] = field(default_factory=list)
    profiles_queued: list[int] = field(default_factory=list)
    _emails: list[int] = field(default_factory=lambda: [0])

    def email(self, name: str = "user") -> str:
        self._emails[0] += 1
        return f"{name}{self._emails[0]}@example.com"

    async def register(self, email: str | None = None, **fields: Any) -> User:
        return await self.auth.register(
            RegisterCommand(email=email or self.email(), password=fields.pop("password", PASSWORD), **fields)
        )

    async def login(self, user: User) -> TokenPair:
        return await self.auth.login(user.email, PASSWORD)

    async def signed_in(self, email: str | None = None) -> tuple[User, TokenPair, Principal]:
        user = await self.register(email)
        pair = await self.login(user)
        return user, pair, await self.auth.authenticate(pair.access_token)

    async def code(self, owner: User, **fields: Any) -> ReferralCode:
        if "expire_time" not in fields:
            fields.setdefault("ttl", timedelta(days=7))
        return await self.referrals.create_code(CreateCodeCommand(owner_id=owner.id, **fields))

    async def send_mail(self) -> list[OutgoingMail]:
        """Send what the mail queue holds now; the messages sent."""
        before = len(self.mailer.sent)
        async with self.store.read() as uow:
            due = await uow.mails.due(self.clock(), 100)
        for mail_id in due:
            await self.mail._attempt(mail_id)
        return self.mailer.sent[before:]

    async def verified(self, email: str | None = None) -> User:
        """A registered user who followed the link of their verification message."""
        user = await self.register(email)
        (message,) = [m for m in await self.send_mail() if m.to == user.email]
        token = message.context["link"].rpartition("token=")[2]
        return await self.accounts.verify_email(token, "", "")

    async def superuser(self) -> User:
        user, _created = await self.auth.create_superuser(self.email("root"), PASSWORD)
        return user


class FakeMailer:
    name = "fake"

    def __init__(self) -> None:
        self.sent: list[OutgoingMail] = []

    async def send(self, mail: OutgoingMail) -> None:
        self.sent.append(mail)

    async def close(self) -> None:
        return None


class MakeDomain(Protocol):
    def __call__(
        self,
        *,
        verifier: FakeVerifier | None = ...,
        fail_closed: bool = ...,
        enrichment: bool = ...,
        disposable: DisposableDomains | None = ...,
        shared_revocations: bool = ...,
    ) -> Domain: ...


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_domain(clock: FakeClock) -> AsyncIterator[MakeDomain]:
    made: list[Domain] = []

    def make(
        *,
        verifier: FakeVerifier | None = None,
        fail_closed: bool = False,
        enrichment: bool = False,
        disposable: DisposableDomains | None = None,
        shared_revocations: bool = False,
    ) -> Domain:
        store = MemoryStore()
        cache = FakeCache(clock)
        revocation_cache = FakeRevocationCache(clock, shared=shared_revocations)
        tokens = JwtCodec(
            TokenConfig(
                signing_key=hmac_key(SECRET),
                issuer="referral-service",
                audience="referral-service",
                access_ttl=ACCESS_TTL,
                refresh_ttl=timedelta(days=30),
            )
        )
        hasher = FastHasher()
        revocations = Revocations(store, revocation_cache, clock=clock)
        referrals = ReferralService(
            store,
            cache,
            page_secret=SECRET,
            max_horizon=MAX_HORIZON,
            cache_ttl=CACHE_TTL,
            negative_cache_ttl=NEGATIVE_CACHE_TTL,
            default_page_size=DEFAULT_PAGE,
            max_page_size=MAX_PAGE,
            request_id_ttl=REQUEST_ID_TTL,
            clock=clock,
        )
        codes_used: list[str] = []
        profiles_queued: list[int] = []

        async def on_code_used(email_key: str) -> None:
            codes_used.append(email_key)
            await referrals.code_used(email_key)

        verification = (
            EmailVerification(verifier, cache, fail_closed=fail_closed, cache_ttl=timedelta(days=1))
            if verifier is not None
            else None
        )
        mailer = FakeMailer()
        mail = MailWorker(
            store,
            mailer,
            MailTokenPolicy(
                verify_ttl=timedelta(hours=24),
                reset_ttl=timedelta(minutes=30),
                verify_link="https://app.example/verify#token={token}",
                reset_link="https://app.example/reset#token={token}",
            ),
            retry_backoff=timedelta(seconds=30),
            retry_max=timedelta(hours=1),
            max_attempts=5,
            concurrency=1,
            poll_seconds=60,
            lease=timedelta(minutes=2),
            clock=clock,
        )
        auth = AuthService(
            store,
            hasher,
            tokens,
            revocations,
            request_id_ttl=REQUEST_ID_TTL,
            on_code_used=on_code_used,
            verification=verification,
            on_mail_queued=mail.notify,
            disposable_domains=disposable,
            clock=clock,
        )
        accounts = AccountEmails(
            store,
            hasher,
            end_sessions=auth.end_user_sessions_in,
            publish_revocations=auth.publish_revocations,
            clock=clock,
        )
        if enrichment:
            accounts.add_on_verified(queue_lookup, lambda: profiles_queued.append(1))
        domain = Domain(
            clock=clock,
            store=store,
            hasher=hasher,
            tokens=tokens,
            cache=cache,
            revocation_cache=revocation_cache,
            revocations=revocations,
            referrals=referrals,
            auth=auth,
            accounts=accounts,
            mailer=mailer,
            mail=mail,
            codes_used=codes_used,
            profiles_queued=profiles_queued,
        )
        made.append(domain)
        return domain

    yield make
    for domain in made:
        await domain.revocations.close()


@pytest.fixture
def domain(make_domain: MakeDomain) -> Domain:
    return make_domain()


async def raises(error: type[Exception], work: Awaitable[object]) -> Any:
    """The error ``work`` raised (which must be of type ``error``)."""
    with pytest.raises(error) as caught:
        await work
    return caught.value
