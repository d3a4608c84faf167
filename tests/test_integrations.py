"""Email verification (Hunter) and profile enrichment (People Data Labs, Clearbit), each vendor
played by a real HTTP server on 127.0.0.1 (tests/fake_http.py), never by patching the client."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from pydantic import ValidationError
from referral.v1 import auth_pb2

from referral_service.config import Profile, Settings
from tests.conftest import PASSWORD, Api, Stack, bearer, start_api, stop_api
from tests.errors import expect_error
from tests.fake_http import FakeHttp, Handler, Response
from tests.vendors import ENRICHMENT_KEY, HUNTER_KEY, Enrichment, Hunter

#: Every registration below must answer within this gRPC deadline, whatever the vendor does.
DEADLINE = 4.0
User = auth_pb2.User
Profile_ = auth_pb2.UserProfile


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[[Handler], Any]]:
    servers: list[FakeHttp] = []

    async def make(handler: Handler) -> FakeHttp:
        server = await FakeHttp(handler).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


def hunter_settings(fake: FakeHttp, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "hunter_api_key": HUNTER_KEY,
        "hunter_base_url": f"{fake.url}/v2",
        "hunter_connect_timeout_seconds": 0.5,
        "hunter_read_timeout_seconds": 0.4,
        "hunter_total_timeout_seconds": 1.0,
        "hunter_retry_backoff_seconds": 0.01,
        "hunter_breaker_threshold": 1000,
    }
    values.update(overrides)
    return values


async def register(api: Api, email: str) -> auth_pb2.User:
    response = await api.auth.Register(
        auth_pb2.RegisterRequest(email=email, password=PASSWORD), timeout=DEADLINE
    )
    return response.user


async def me(api: Api, email: str) -> auth_pb2.User:
    tokens = await api.login(email)
    response = await api.auth.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token), timeout=DEADLINE
    )
    return response.user


# --- email verification ------------------------------------------------------------------------


@pytest.mark.sqlite_stack
async def test_the_decision_is_taken_on_data_status(stack: Stack, fakes: Any) -> None:
    hunter = await fakes(Hunter())
    api = await start_api(stack, **hunter_settings(hunter))
    try:
        accepted = {
            "valid": (True, User.EMAIL_VERIFICATION_VALID),
            "webmail": (False, User.EMAIL_VERIFICATION_WEBMAIL),  # Gmail users are welcome
            "acceptall": (False, User.EMAIL_VERIFICATION_ACCEPT_ALL),
            "later": (True, User.EMAIL_VERIFICATION_VALID),  # 202, then an answer
        }
        for scenario, (verified, outcome) in accepted.items():
            email = f"{scenario}-{stack.name}@example.com"
            user = await register(api, email)
            # Deliverability, never verification: only the owner's link verifies.
            assert (user.is_verified, user.email_deliverability) == (False, outcome), scenario
            assert user.email_verification == outcome  # the deprecated twin
            assert user.HasField("deliverability_check_time")
            assert user.email_verify_time == user.deliverability_check_time
            stored = await me(api, email)
            assert (stored.is_verified, stored.email_deliverability) == (False, outcome), scenario
            assert verified == (outcome == User.EMAIL_VERIFICATION_VALID)
        assert hunter.handler.seen["later-sqlite-memory@example.com"] == 2

        refused = {"invalid": "EMAIL_UNDELIVERABLE", "disposable": "EMAIL_DISPOSABLE"}
        for scenario, reason in refused.items():
            email = f"{scenario}-x@example.com"
            error = await expect_error(register(api, email), grpc.StatusCode.INVALID_ARGUMENT, reason)
            assert "email" in error.fields
            # nobody was created
            await expect_error(api.login(email), grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    finally:
        await stop_api(api)


INCONCLUSIVE = {
    # scenario: (outcome under fail-open, Hunter requests per registration)
    "unknown": (User.EMAIL_VERIFICATION_UNKNOWN, 1),
    "weird": (User.EMAIL_VERIFICATION_UNKNOWN, 1),  # a status this code does not know
    "s202": (User.EMAIL_VERIFICATION_UNKNOWN, 3),  # bounded retry, then give up
    "s222": (User.EMAIL_VERIFICATION_UNKNOWN, 3),
    "s401": (User.EMAIL_VERIFICATION_UNAVAILABLE, 1),
    "s403": (User.EMAIL_VERIFICATION_UNAVAILABLE, 1),
    "s429": (User.EMAIL_VERIFICATION_UNAVAILABLE, 1),
    "s500": (User.EMAIL_VERIFICATION_UNAVAILABLE, 1),
    "hang": (User.EMAIL_VERIFICATION_UNAVAILABLE, 1),  # read timeout; bounded by DEADLINE
    "malformed": (User.EMAIL_VERIFICATION_UNAVAILABLE, 1),
    "nodata": (User.EMAIL_VERIFICATION_UNAVAILABLE, 1),
    "other": (User.EMAIL_VERIFICATION_UNAVAILABLE, 1),  # the answer is about someone else
}


@pytest.mark.sqlite_stack
async def test_fail_open_accepts_unverified_when_hunter_cannot_tell(stack: Stack, fakes: Any) -> None:
    hunter = await fakes(Hunter())
    api = await start_api(stack, **hunter_settings(hunter, hunter_policy="fail_open"))
    try:
        for scenario, (outcome, requests) in INCONCLUSIVE.items():
            email = f"{scenario}-open@example.com"
            user = await register(api, email)  # within DEADLINE, even when Hunter hangs
            assert not user.is_verified, scenario
            assert user.email_verification == outcome, scenario
            assert hunter.handler.seen[email] == requests, scenario
            assert (await me(api, email)).email_verification == outcome
    finally:
        await stop_api(api)


@pytest.mark.sqlite_stack
async def test_fail_closed_refuses_with_retry_info_when_hunter_cannot_tell(stack: Stack, fakes: Any) -> None:
    hunter = await fakes(Hunter())
    api = await start_api(stack, **hunter_settings(hunter, hunter_policy="fail_closed"))
    try:
        for scenario in INCONCLUSIVE:
            email = f"{scenario}-closed@example.com"
            error = await expect_error(
                register(api, email), grpc.StatusCode.UNAVAILABLE, "EMAIL_VERIFICATION_UNAVAILABLE"
            )
            assert error.retry_seconds is not None, scenario
            assert error.retry_seconds >= (7 if scenario == "s429" else 1), scenario  # Retry-After
            await expect_error(api.login(email), grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
        # definite answers are unaffected by the policy
        valid = await register(api, "valid-closed@example.com")
        assert (valid.email_deliverability, valid.is_verified) == (User.EMAIL_VERIFICATION_VALID, False)
    finally:
        await stop_api(api)


@pytest.mark.sqlite_stack
async def test_a_hanging_hunter_costs_at_most_the_configured_timeout(stack: Stack, fakes: Any) -> None:
    """The deadline is the proof: with no bound, the call would fail DEADLINE_EXCEEDED."""
    hunter = await fakes(Hunter())
    api = await start_api(
        stack,
        **hunter_settings(hunter, hunter_read_timeout_seconds=5.0, hunter_total_timeout_seconds=0.3),
    )
    try:
        response = await api.auth.Register(
            auth_pb2.RegisterRequest(email="hang-total@example.com", password=PASSWORD), timeout=1.5
        )
        assert response.user.email_verification == User.EMAIL_VERIFICATION_UNAVAILABLE
    finally:
        await stop_api(api)


@pytest.mark.sqlite_stack
async def test_the_circuit_breaker_stops_calling_a_failing_hunter(stack: Stack, fakes: Any) -> None:
    hunter = await fakes(Hunter())
    api = await start_api(
        stack, **hunter_settings(hunter, hunter_breaker_threshold=2, hunter_breaker_reset_seconds=60)
    )
    try:
        for i in range(2):
            await register(api, f"s500-{i}@example.com")
        assert len(hunter.requests) == 2
        # open: the next registration does not reach Hunter, and fails open at once
        user = await register(api, "valid-breaker@example.com")
        assert user.email_verification == User.EMAIL_VERIFICATION_UNAVAILABLE
        assert len(hunter.requests) == 2
    finally:
        await stop_api(api)


@pytest.mark.sqlite_stack
async def test_key_only_in_the_header_email_encoded_and_nothing_secret_logged(
    stack: Stack, fakes: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hunter = await fakes(Hunter())
    api = await start_api(stack, **hunter_settings(hunter))
    try:
        tricky = "tom+tag&api_key=stolen@example.com"
        user = await register(api, tricky)
        assert user.email == tricky
        assert user.email_deliverability == User.EMAIL_VERIFICATION_VALID
        await register(api, "s401-log@example.com")  # errors get logged too
        for request in hunter.requests:
            assert HUNTER_KEY not in request.target
            assert request.headers["x-api-key"] == HUNTER_KEY
            assert set(request.query) == {"email"}
        first = hunter.requests[0]
        assert first.param("email") == tricky  # '+' and '&' arrived encoded, intact
        assert "%2B" in first.target
        assert "%26" in first.target
        assert HUNTER_KEY not in caplog.text
        assert HUNTER_KEY not in repr(api.app.verifier)
        assert HUNTER_KEY not in repr(api.app.settings)
        assert "hunter refused the request (http 401)" in caplog.text
    finally:
        await stop_api(api)


async def test_answers_are_cached_so_retries_spend_no_credits(stack: Stack, fakes: Any) -> None:
    """On the in-process cache (sqlite-memory) and on Redis (postgres-redis)."""
    hunter = await fakes(Hunter())
    api = await start_api(stack, **hunter_settings(hunter))
    try:
        # a refused address, tried twice
        for _ in range(2):
            await expect_error(register(api, "invalid-cache@example.com"), grpc.StatusCode.INVALID_ARGUMENT)
        assert hunter.handler.seen["invalid-cache@example.com"] == 1
        # an accepted address whose first registration failed for another reason
        await expect_error(
            api.auth.Register(
                auth_pb2.RegisterRequest(
                    email="Valid-Cache@Example.com", password=PASSWORD, referral_code="NOPE1234"
                ),
                timeout=DEADLINE,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "REFERRAL_CODE_UNKNOWN",
        )
        user = await register(api, "valid-cache@example.com")  # same address, other case
        assert user.email_deliverability == User.EMAIL_VERIFICATION_VALID
        assert len(hunter.calls()) == 2
        # inconclusive answers are not cached: a retry asks again
        await register(api, "unknown-a@example.com")
        await expect_error(register(api, "unknown-a@example.com"), grpc.StatusCode.ALREADY_EXISTS)
        await expect_error(
            register(api, "unknown-a@example.com"), grpc.StatusCode.ALREADY_EXISTS
        )  # a duplicate is refused before Hunter is asked
        assert hunter.handler.seen["unknown-a@example.com"] == 1
    finally:
        await stop_api(api)


# --- enrichment ----------------------------------------------------------------------------------


def enrichment_settings(fake: FakeHttp, vendor: str, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "enrichment_provider": vendor,
        "enrichment_api_key": ENRICHMENT_KEY,
        "enrichment_base_url": fake.url,
        "enrichment_connect_timeout_seconds": 0.5,
        "enrichment_read_timeout_seconds": 0.4,
        "enrichment_max_attempts": 3,
        "enrichment_retry_backoff": timedelta(milliseconds=20),
        "enrichment_retry_max": timedelta(milliseconds=100),
        "enrichment_breaker_threshold": 1000,
    }
    values.update(overrides)
    return values


async def eventually_profile(api: Api, email: str, *, attempts: int = 300) -> auth_pb2.UserProfile:
    """Poll GetCurrentUser (bounded) until the profile is no longer pending."""
    tokens = await api.login(email)
    for _ in range(attempts):
        response = await api.auth.GetCurrentUser(
            auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token), timeout=DEADLINE
        )
        assert response.user.HasField("profile")
        if response.user.profile.state != Profile_.STATE_PENDING:
            return response.user.profile
        await asyncio.sleep(0.05)
    raise AssertionError(f"the profile of {email} stayed pending")


async def test_people_data_labs_profile_appears_through_get_current_user(stack: Stack, fakes: Any) -> None:
    pdl = await fakes(Enrichment("peopledatalabs"))
    api = await start_api(stack, **enrichment_settings(pdl, "peopledatalabs"))
    try:
        email = "found.ada+x&y@example.com"
        user = await register(api, email)
        # Nobody reads a profile of an address before its owner proved it.
        assert not user.HasField("profile")
        assert not (await me(api, email)).HasField("profile")
        await asyncio.sleep(0.2)
        assert not pdl.requests  # and nobody looked it up
        user = await api.verify(email)
        assert user.profile.state == Profile_.STATE_PENDING  # verification did not wait
        profile = await eventually_profile(api, email)
        assert profile.state == Profile_.STATE_FOUND
        assert (profile.full_name, profile.company, profile.title, profile.location) == (
            "Ada Lovelace",
            "Analytical Engines",
            "Principal Analyst",
            "London, England, United Kingdom",
        )
        assert profile.source == "peopledatalabs"
        assert profile.HasField("fetch_time")
        (request,) = pdl.calls("/v5/person/enrich")
        assert request.headers["x-api-key"] == ENRICHMENT_KEY
        assert ENRICHMENT_KEY not in request.target
        assert request.param("email") == email
        assert request.param("titlecase") == "true"
        # the user is otherwise untouched
        assert (await me(api, email)).id == user.id
    finally:
        await stop_api(api)


@pytest.mark.sqlite_stack
async def test_clearbit_profile_after_a_queued_answer(stack: Stack, fakes: Any) -> None:
    clearbit = await fakes(Enrichment("clearbit"))
    api = await start_api(stack, **enrichment_settings(clearbit, "clearbit"))
    try:
        await register(api, "later-grace@example.com")  # 202 (queued) first, then the person
        await api.verify("later-grace@example.com")
        profile = await eventually_profile(api, "later-grace@example.com")
        assert profile.state == Profile_.STATE_FOUND
        assert (profile.full_name, profile.company, profile.title) == (
            "Grace Hopper",
            "US Navy",
            "Rear Admiral",
        )
        assert profile.avatar_uri == "https://images.example.com/grace.png"
        assert profile.source == "clearbit"
        requests = clearbit.calls("/v2/people/find")
        assert len(requests) == 2
        for request in requests:
            assert request.headers["authorization"] == f"Bearer {ENRICHMENT_KEY}"
            assert ENRICHMENT_KEY not in request.target
    finally:
        await stop_api(api)


@pytest.mark.sqlite_stack
async def test_failed_or_empty_lookups_leave_the_user_intact(stack: Stack, fakes: Any) -> None:
    pdl = await fakes(Enrichment("peopledatalabs"))
    api = await start_api(stack, **enrichment_settings(pdl, "peopledatalabs"))
    try:
        expected = {
            "missing": (Profile_.STATE_NOT_FOUND, 1),
            "empty": (Profile_.STATE_NOT_FOUND, 1),
            "later": (Profile_.STATE_FOUND, 2),  # 500 once, retried
            "s500": (Profile_.STATE_FAILED, 3),  # bounded: enrichment_max_attempts
            "s402": (Profile_.STATE_FAILED, 3),  # out of credits
            "s429": (Profile_.STATE_FAILED, 3),
            "malformed": (Profile_.STATE_FAILED, 3),
            "hang": (Profile_.STATE_FAILED, 3),  # read timeout each time
        }
        emails = {scenario: f"{scenario}-pdl@example.com" for scenario in expected}
        users = {s: await register(api, e) for s, e in emails.items()}
        for address in emails.values():
            await api.verify(address)
        for scenario, (state, requests) in expected.items():
            profile = await eventually_profile(api, emails[scenario])
            assert profile.state == state, scenario
            assert pdl.handler.seen[emails[scenario]] == requests, scenario
            if state != Profile_.STATE_FOUND:
                assert not profile.full_name
                assert not profile.company
            current = await me(api, emails[scenario])
            assert current.id == users[scenario].id
            assert current.email == emails[scenario]
            assert current.is_active
    finally:
        await stop_api(api)


async def test_pending_enrichment_resumes_after_a_restart(stack: Stack, fakes: Any) -> None:
    """The first server stops while the lookup is in flight (the vendor hangs); the lookup is
    handed back to the database, and the next server, on the same database, finishes it."""
    hanging = await fakes(lambda request: Response(hang=True))
    first = await start_api(
        stack,
        **enrichment_settings(hanging, "peopledatalabs", enrichment_read_timeout_seconds=30.0),
    )
    email = "found-restart@example.com"
    try:
        await register(first, email)
        user = await first.verify(email)  # not delayed by the hanging vendor
        assert user.profile.state == Profile_.STATE_PENDING
        for _ in range(100):
            if hanging.requests:
                break
            await asyncio.sleep(0.02)
        assert hanging.requests, "the lookup never started"
    finally:
        await stop_api(first)  # grace 0: the lookup is interrupted and handed back

    working = await fakes(Enrichment("peopledatalabs"))
    second = await start_api(stack, **enrichment_settings(working, "peopledatalabs"))
    try:
        profile = await eventually_profile(second, email)
        assert profile.state == Profile_.STATE_FOUND
        assert profile.full_name == "Ada Lovelace"
        assert len(working.requests) == 1
    finally:
        await stop_api(second)


@pytest.mark.sqlite_stack
async def test_integrations_are_off_by_default(api: Api) -> None:
    assert api.app.verifier is None
    assert api.app.enrichment is None
    user = await api.register()
    assert user.email_verification == User.EMAIL_VERIFICATION_UNSPECIFIED
    assert not user.HasField("email_verify_time")
    assert not user.HasField("profile")


# --- settings ----------------------------------------------------------------------------------


def test_integration_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="REFERRAL_ENRICHMENT_API_KEY"):
        Settings(_env_file=None, enrichment_provider="peopledatalabs")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        Settings(_env_file=None, hunter_base_url="ftp://hunter")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="REFERRAL_HUNTER_BASE_URL must be https"):
        Settings(  # type: ignore[call-arg]
            _env_file=None,
            profile=Profile.PRODUCTION,
            jwt_secret="s" * 40,
            client_secret_key="k" * 40,
            database_url="postgresql+asyncpg://db/referral",
            redis_url="redis://cache:6379/0",
            hunter_api_key="k",
            hunter_base_url="http://hunter.internal/v2",
        )
    monkeypatch.setenv("REFERRAL_HUNTER_API_KEY", "")
    monkeypatch.setenv("REFERRAL_HUNTER_POLICY", "fail_closed")
    monkeypatch.setenv("REFERRAL_ENRICHMENT_PROVIDER", "clearbit")
    monkeypatch.setenv("REFERRAL_ENRICHMENT_API_KEY", "secret-key")
    monkeypatch.setenv("REFERRAL_ENRICHMENT_BASE_URL", "https://breeze.example.com/")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert not settings.hunter.enabled
    assert settings.hunter.policy.value == "fail_closed"
    assert settings.enrichment.enabled
    assert settings.enrichment.base_url == "https://breeze.example.com"
    assert "secret-key" not in repr(settings)
