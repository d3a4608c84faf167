"""Registration: validation, one account per email, referral codes, request ids, the email check
and the enrichment job."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from referral_service.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Reason,
    Unauthenticated,
    Unavailable,
)
from referral_service.domain.models import EmailStatus, Profile, ProfileState
from referral_service.domain.validation import DisposableDomains
from tests.domain.conftest import PASSWORD, REQUEST_ID_TTL, Domain, MakeDomain, raises
from tests.domain.fakes import FakeClock, FakeVerifier


async def test_register_stores_the_normalised_account(domain: Domain) -> None:
    user = await domain.register("  Ada.Lovelace@EXAMPLE.com ")
    assert user.email == "Ada.Lovelace@example.com"
    assert (user.is_active, user.is_verified, user.is_superuser, user.referrer_id) == (
        True,
        False,
        False,
        None,
    )
    assert user.create_time == domain.clock()
    assert user.email_verification is None
    assert user.profile is None
    async with domain.store.read() as uow:
        credentials = await uow.users.credentials("ada.lovelace@example.com")
    assert credentials is not None
    assert credentials.user_id == user.id
    assert credentials.password_hash == await domain.hasher.hash(PASSWORD)


async def test_every_bad_field_is_named_at_once(domain: Domain) -> None:
    error = await raises(
        InvalidArgument,
        domain.register("not-an-email", password="short", referral_code="a!", request_id="nope"),
    )
    assert error.reason is Reason.VALIDATION_FAILED
    assert {v.field: v.reason for v in error.violations} == {
        "email": "INVALID_EMAIL",
        "password": "TOO_SHORT",
        "referral_code": "INVALID_LENGTH",
        "request_id": "INVALID_FORMAT",
    }


async def test_weak_passwords_are_refused(domain: Domain) -> None:
    common = await raises(InvalidArgument, domain.register(password="password123"))
    assert [v.reason for v in common.violations] == ["COMMON_PASSWORD"]
    own = await raises(InvalidArgument, domain.register("grace.hopper@example.com", password="grace.hopper"))
    assert [v.reason for v in own.violations] == ["CONTEXT_SPECIFIC"]
    empty = await raises(InvalidArgument, domain.register(password=""))
    assert [(v.field, v.reason) for v in empty.violations] == [("password", "REQUIRED")]


async def test_one_account_per_email_whatever_its_case(domain: Domain) -> None:
    await domain.register("alice@example.com")
    error = await raises(AlreadyExists, domain.register("ALICE@Example.COM"))
    assert error.reason is Reason.EMAIL_ALREADY_REGISTERED
    assert [v.field for v in error.violations] == ["email"]


async def test_concurrent_registrations_of_one_email_make_one_account(domain: Domain) -> None:
    results = await asyncio.gather(
        *(domain.register("race@example.com") for _ in range(6)), return_exceptions=True
    )
    users = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(users) == 1
    assert all(isinstance(e, AlreadyExists) and e.reason is Reason.EMAIL_ALREADY_REGISTERED for e in errors)


async def test_disposable_domains_are_refused_when_configured(make_domain: MakeDomain) -> None:
    domain = make_domain(disposable=DisposableDomains(extra=["trash.example"]))
    error = await raises(InvalidArgument, domain.register("me@mail.trash.example"))
    assert error.reason is Reason.EMAIL_DISPOSABLE
    assert (await domain.register("me@example.com")).email == "me@example.com"


# --- referral codes ----------------------------------------------------------------------------


async def test_a_referral_code_links_the_new_account_and_counts_a_use(domain: Domain) -> None:
    referrer = await domain.register("referrer@example.com")
    code = await domain.code(referrer, code="Spring24", max_uses=3)
    user = await domain.register(referral_code=" spring24 ")
    assert user.referrer_id == referrer.id
    page = await domain.referrals.list_referrals(referrer.id, referrer.id, 0, "")
    assert page.total_size == 1
    assert [(r.user_id, r.code) for r in page.referrals] == [(user.id, "SPRING24")]
    async with domain.store.read() as uow:
        stored = await uow.codes.get(code.id)
    assert stored is not None
    assert stored.use_count == 1
    # The owner's cached code is dropped after the commit.
    assert domain.codes_used == ["referrer@example.com"]
    assert "public-code-by-email:referrer@example.com" in domain.cache.invalidations


async def test_an_unknown_code_is_refused(domain: Domain) -> None:
    error = await raises(InvalidArgument, domain.register(referral_code="NOPE1234"))
    assert error.reason is Reason.REFERRAL_CODE_UNKNOWN
    assert [v.field for v in error.violations] == ["referral_code"]


async def test_ones_own_code_is_refused(domain: Domain) -> None:
    owner = await domain.register("self@example.com")
    await domain.code(owner, code="MINE1")
    error = await raises(InvalidArgument, domain.register("SELF@example.com", referral_code="mine1"))
    assert error.reason is Reason.SELF_REFERRAL


async def test_an_expired_code_is_refused_and_nothing_is_written(domain: Domain) -> None:
    owner = await domain.register()
    await domain.code(owner, code="SOON1", ttl=timedelta(hours=1))
    domain.clock.advance(hours=1)  # expire_time == now: expired
    error = await raises(FailedPrecondition, domain.register("late@example.com", referral_code="SOON1"))
    assert error.reason is Reason.REFERRAL_CODE_EXPIRED
    assert error.metadata == {"code": "SOON1"}
    async with domain.store.read() as uow:
        assert await uow.users.by_email_key("late@example.com") is None
        assert await uow.referrals.count(owner.id) == 0


async def test_a_revoked_code_is_refused(domain: Domain) -> None:
    owner = await domain.register()
    await domain.code(owner, code="GONE1")
    await domain.referrals.delete_code(owner.id)
    error = await raises(FailedPrecondition, domain.register(referral_code="GONE1"))
    assert error.reason is Reason.REFERRAL_CODE_REVOKED


async def test_a_used_up_code_is_refused(domain: Domain) -> None:
    owner = await domain.register()
    await domain.code(owner, code="ONCE1", max_uses=1)
    await domain.register(referral_code="ONCE1")
    error = await raises(FailedPrecondition, domain.register(referral_code="ONCE1"))
    assert error.reason is Reason.REFERRAL_CODE_EXHAUSTED


async def test_concurrent_registrations_never_use_a_code_past_its_limit(domain: Domain) -> None:
    owner = await domain.register()
    await domain.code(owner, code="FEW1", max_uses=2)
    results = await asyncio.gather(
        *(domain.register(referral_code="FEW1") for _ in range(6)), return_exceptions=True
    )
    made = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(made) == 2
    assert all(
        isinstance(e, FailedPrecondition) and e.reason is Reason.REFERRAL_CODE_EXHAUSTED for e in refused
    )
    page = await domain.referrals.list_referrals(owner.id, owner.id, 0, "")
    assert page.total_size == 2


# --- request ids -------------------------------------------------------------------------------


async def test_a_retried_request_id_returns_the_first_account(domain: Domain) -> None:
    request_id = str(uuid.uuid4())
    first = await domain.register("retry@example.com", request_id=request_id)
    again = await domain.register("Retry@example.com", request_id=request_id)
    assert again == first


async def test_a_request_id_reused_for_another_request_is_refused(domain: Domain) -> None:
    request_id = str(uuid.uuid4())
    await domain.register("one@example.com", request_id=request_id)
    error = await raises(InvalidArgument, domain.register("two@example.com", request_id=request_id))
    assert error.reason is Reason.REQUEST_ID_CONFLICT
    assert [v.field for v in error.violations] == ["request_id"]


async def test_a_request_id_is_forgotten_after_its_ttl(domain: Domain) -> None:
    request_id = str(uuid.uuid4())
    await domain.register("forget@example.com", request_id=request_id)
    domain.clock.advance(REQUEST_ID_TTL)
    error = await raises(AlreadyExists, domain.register("forget@example.com", request_id=request_id))
    assert error.reason is Reason.EMAIL_ALREADY_REGISTERED
    # ...and the id may name a new request.
    other = await domain.register("new@example.com", request_id=request_id)
    assert other.email == "new@example.com"


async def test_concurrent_retries_of_one_request_return_one_account(domain: Domain) -> None:
    request_id = str(uuid.uuid4())
    users = await asyncio.gather(
        *(domain.register("burst@example.com", request_id=request_id) for _ in range(5))
    )
    assert len({user.id for user in users}) == 1


# --- email verification and enrichment ---------------------------------------------------------


async def test_a_deliverable_email_is_not_a_verified_one(make_domain: MakeDomain, clock: FakeClock) -> None:
    """The provider's verdict is deliverability; only the owner's link sets is_verified."""
    domain = make_domain(verifier=FakeVerifier(clock))
    user = await domain.register("valid@example.com")
    assert user.is_verified is False
    assert user.email_verification is EmailStatus.VALID
    assert user.email_verify_time == domain.clock()
    verified = await domain.verified("other-valid@example.com")
    assert (verified.is_verified, verified.verify_time) == (True, domain.clock())


async def test_an_undeliverable_email_is_refused_and_the_answer_cached(
    make_domain: MakeDomain, clock: FakeClock
) -> None:
    verifier = FakeVerifier(clock, status=EmailStatus.INVALID)
    domain = make_domain(verifier=verifier)
    for _ in range(2):
        error = await raises(InvalidArgument, domain.register("bounce@example.com"))
        assert error.reason is Reason.EMAIL_UNDELIVERABLE
    assert verifier.calls == ["bounce@example.com"]
    async with domain.store.read() as uow:
        assert await uow.users.by_email_key("bounce@example.com") is None


async def test_a_taken_email_spends_no_verification(make_domain: MakeDomain, clock: FakeClock) -> None:
    verifier = FakeVerifier(clock)
    domain = make_domain(verifier=verifier)
    await domain.register("taken@example.com")
    error = await raises(AlreadyExists, domain.register("taken@example.com"))
    assert error.reason is Reason.EMAIL_ALREADY_REGISTERED
    assert verifier.calls == ["taken@example.com"]


async def test_an_unreachable_verifier_fails_open_or_closed(
    make_domain: MakeDomain, clock: FakeClock
) -> None:
    open_domain = make_domain(verifier=FakeVerifier(clock, status=EmailStatus.UNAVAILABLE))
    user = await open_domain.register("open@example.com")
    assert user.is_verified is False
    assert user.email_verification is EmailStatus.UNAVAILABLE
    closed = make_domain(
        verifier=FakeVerifier(clock, status=EmailStatus.UNAVAILABLE),
        fail_closed=True,
    )
    error = await raises(Unavailable, closed.register("closed@example.com"))
    assert error.reason is Reason.EMAIL_VERIFICATION_UNAVAILABLE
    assert error.retry_after_seconds is not None


async def test_verification_not_registration_queues_an_enrichment_job(make_domain: MakeDomain) -> None:
    domain = make_domain(enrichment=True)
    user = await domain.register()
    assert user.profile is None
    async with domain.store.read() as uow:
        assert await uow.profiles.due(domain.clock(), 10) == []
    (message,) = await domain.send_mail()
    token = message.context["link"].rpartition("token=")[2]
    verified = await domain.accounts.verify_email(token, "", "")
    assert verified.profile == Profile(state=ProfileState.PENDING)
    assert domain.profiles_queued == [1]
    async with domain.store.read() as uow:
        assert await uow.profiles.due(domain.clock(), 10) == [user.id]


async def test_create_superuser_creates_or_promotes(domain: Domain) -> None:
    root, created = await domain.auth.create_superuser("root@example.com", PASSWORD)
    assert (created, root.is_superuser) == (True, True)
    plain, pair, _ = await domain.signed_in("plain@example.com")
    # An existing account is refused and left as it was: whoever registered first gains nothing.
    refused = await raises(
        AlreadyExists, domain.auth.create_superuser("Plain@EXAMPLE.com", "operator's new password 1")
    )
    assert refused.reason is Reason.EMAIL_ALREADY_REGISTERED
    assert not (
        await domain.auth.current_user(await domain.auth.authenticate(pair.access_token))
    ).is_superuser
    # Promoting it takes the operator's password and ends every session of the account.
    promoted, created = await domain.auth.create_superuser(
        "plain@example.com", "operator's new password 1", promote_existing=True
    )
    assert (created, promoted.id, promoted.is_superuser) == (False, plain.id, True)
    for ended in (domain.auth.authenticate(pair.access_token), domain.auth.refresh(pair.refresh_token)):
        assert (await raises(Unauthenticated, ended)).reason is Reason.TOKEN_REVOKED
    wrong = await raises(Unauthenticated, domain.auth.login("plain@example.com", PASSWORD))
    assert wrong.reason is Reason.INVALID_CREDENTIALS
    await domain.auth.login("plain@example.com", "operator's new password 1")
    # Promoting an address nobody has creates the superuser.
    _, created = await domain.auth.create_superuser("new-root@example.com", PASSWORD, promote_existing=True)
    assert created
