"""The referral programme (issue 17), through the wire on SQLite and PostgreSQL with Redis:
conversions reported by services qualify referrals, both sides get rewards held for a while,
refunds cancel or claw them back, retries and concurrent duplicates grant nothing twice, and
the referrer's caps hold under concurrency.

The referee's verification: tests follow the link of the referee's verification message
(``verify``: VerifyEmail re-evaluates the referral in the transaction that verifies). Time: the
rewards service's clock is replaced (``FakeClock``) to move past a hold without sleeping."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from google.type import money_pb2
from referral.v1 import auth_pb2, referral_pb2

from referral_service.domain.clock import utcnow
from referral_service.domain.rewards import parse_rules
from referral_service.startup import StartupError
from tests.conftest import PASSWORD, Api, Stack, bearer, start_api, stop_api
from tests.errors import expect_error
from tests.test_service_accounts import service_token

Reward = referral_pb2.Reward
DAY = timedelta(days=1)

RULES = """
[program]
id = "launch-2026"
qualifying_kinds = ["purchase"]
required_conversions = 1
hold_seconds = 1209600  # 14 days
referrer_reward = { amount = 1000, unit = "USD" }
referee_reward = { amount = 500, unit = "USD" }
referrer_monthly_cap = 3
referrer_lifetime_cap = 100
"""


class FakeClock:
    """The rewards service's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now


def rules_file(tmp_path: Path, text: str = RULES) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


@pytest.fixture
async def programme(stack: Stack, tmp_path: Path) -> AsyncIterator[tuple[Api, FakeClock]]:
    api = await start_api(stack, rewards_rules_file=rules_file(tmp_path))
    clock = FakeClock()
    api.app.services.rewards.clock = clock
    try:
        yield api, clock
    finally:
        await stop_api(api)


async def verify(api: Api, user_id: int, clock: FakeClock) -> None:
    """Verify the user as they would: follow the link of their verification message (VerifyEmail
    re-evaluates their referral in its transaction). For a user verified already, evaluate the
    referral again directly (which must grant nothing twice)."""
    async with api.app.store.read() as uow:
        user = await uow.users.get(user_id)
    assert user is not None
    if not user.is_verified:
        assert (await api.verify(user.email)).is_verified
        return
    await api.app.store.transact(lambda uow: api.app.services.rewards.referee_verified(uow, user_id, clock()))


async def referrer_and_code(api: Api) -> tuple[auth_pb2.User, str, str]:
    email = api.unique_email("referrer")
    user = await api.register(email)
    token = (await api.login(email)).access_token
    code = await api.referral.CreateReferralCode(
        referral_pb2.CreateReferralCodeRequest(ttl={"seconds": 86400}), metadata=bearer(token)
    )
    return user, token, code.referral_code.code


async def referee(api: Api, code: str, *, verified: bool, clock: FakeClock) -> tuple[auth_pb2.User, str]:
    email = api.unique_email("referee")
    user = await api.register(email, referral_code=code)
    if verified:
        await verify(api, user.id, clock)
    return user, (await api.login(email)).access_token


def purchase(user_id: int, event_id: str | None = None, **kw: object) -> referral_pb2.RecordConversionRequest:
    return referral_pb2.RecordConversionRequest(
        user_id=user_id,
        event_id=event_id or f"inv_{uuid.uuid4().hex}",
        kind="purchase",
        value=money_pb2.Money(currency_code="USD", units=49, nanos=990_000_000),
        **kw,  # type: ignore[arg-type]
    )


async def balance(api: Api, user_id: int, token: str) -> dict[str, tuple[int, int, int, int]]:
    response = await api.referral.GetRewardBalance(
        referral_pb2.GetRewardBalanceRequest(user_id=user_id), metadata=bearer(token)
    )
    return {b.unit: (b.available, b.held, b.canceled, b.clawed_back) for b in response.balances}


async def rewards(api: Api, user_id: int, token: str) -> list[referral_pb2.Reward]:
    response = await api.referral.ListRewards(
        referral_pb2.ListRewardsRequest(user_id=user_id), metadata=bearer(token)
    )
    return list(response.rewards)


async def test_the_full_story(programme: tuple[Api, FakeClock]) -> None:
    api, clock = programme
    alice, alice_token, code = await referrer_and_code(api)
    bob, bob_token = await referee(api, code, verified=True, clock=clock)
    billing = bearer(await service_token(api, "conversions:write"))

    recorded = await api.referral.RecordConversion(purchase(bob.id, "inv_1001"), metadata=billing)
    assert recorded.conversion.event_id == "inv_1001"
    assert recorded.conversion.value.units == 49
    assert recorded.referral.state == referral_pb2.REFERRAL_STATE_REWARDED
    assert recorded.referral.referrer_id == alice.id
    granted = {(r.user_id, r.role, r.amount, r.unit, r.state, r.rule) for r in recorded.rewards}
    assert granted == {
        (alice.id, Reward.ROLE_REFERRER, 1000, "USD", Reward.STATE_HELD, "launch-2026/referrer"),
        (bob.id, Reward.ROLE_REFEREE, 500, "USD", Reward.STATE_HELD, "launch-2026/referee"),
    }
    assert await balance(api, alice.id, alice_token) == {"USD": (0, 1000, 0, 0)}
    assert await balance(api, bob.id, bob_token) == {"USD": (0, 500, 0, 0)}
    listed = await api.referral.ListReferrals(
        referral_pb2.ListReferralsRequest(referrer_id=alice.id), metadata=bearer(alice_token)
    )
    assert [(r.user_id, r.state) for r in listed.referrals] == [
        (bob.id, referral_pb2.REFERRAL_STATE_REWARDED)
    ]
    assert listed.referrals[0].reward_time.seconds > 0

    # The hold ends: nothing is called, the reads say AVAILABLE.
    clock.now += 14 * DAY + timedelta(seconds=1)
    assert await balance(api, alice.id, alice_token) == {"USD": (1000, 0, 0, 0)}
    assert await balance(api, bob.id, bob_token) == {"USD": (500, 0, 0, 0)}
    assert [r.state for r in await rewards(api, alice.id, alice_token)] == [Reward.STATE_AVAILABLE]

    # The refund claws both back, with correcting entries; reversing again changes nothing.
    for _ in range(2):
        reversed_ = await api.referral.ReverseConversion(
            referral_pb2.ReverseConversionRequest(event_id="inv_1001"), metadata=billing
        )
        assert reversed_.conversion.reverse_time.seconds > 0
        assert {(r.user_id, r.state) for r in reversed_.rewards} == {
            (alice.id, Reward.STATE_CLAWED_BACK),
            (bob.id, Reward.STATE_CLAWED_BACK),
        }
    assert await balance(api, alice.id, alice_token) == {"USD": (0, 0, 0, 1000)}
    assert await balance(api, bob.id, bob_token) == {"USD": (0, 0, 0, 500)}
    pending = await api.referral.ListReferrals(
        referral_pb2.ListReferralsRequest(referrer_id=alice.id, state=referral_pb2.REFERRAL_STATE_PENDING),
        metadata=bearer(alice_token),
    )
    assert [r.user_id for r in pending.referrals] == [bob.id]

    # A later purchase qualifies the referral again: new rewards, held again.
    again = await api.referral.RecordConversion(purchase(bob.id, "inv_1002"), metadata=billing)
    assert {r.state for r in again.rewards} == {Reward.STATE_HELD}
    assert await balance(api, alice.id, alice_token) == {"USD": (0, 1000, 0, 1000)}


async def test_a_refund_during_the_hold_cancels(programme: tuple[Api, FakeClock]) -> None:
    api, clock = programme
    alice, alice_token, code = await referrer_and_code(api)
    bob, _ = await referee(api, code, verified=True, clock=clock)
    billing = bearer(await service_token(api, "conversions:write"))
    await api.referral.RecordConversion(purchase(bob.id, "inv_2001"), metadata=billing)
    reversed_ = await api.referral.ReverseConversion(
        referral_pb2.ReverseConversionRequest(event_id="inv_2001"), metadata=billing
    )
    assert {r.state for r in reversed_.rewards} == {Reward.STATE_CANCELED}
    assert await balance(api, alice.id, alice_token) == {"USD": (0, 0, 1000, 0)}
    clock.now += 30 * DAY  # a canceled reward never becomes available
    assert await balance(api, alice.id, alice_token) == {"USD": (0, 0, 1000, 0)}


async def test_conversions_wait_for_the_referees_verification(programme: tuple[Api, FakeClock]) -> None:
    api, clock = programme
    alice, alice_token, code = await referrer_and_code(api)
    bob, _ = await referee(api, code, verified=False, clock=clock)
    billing = bearer(await service_token(api, "conversions:write"))
    recorded = await api.referral.RecordConversion(purchase(bob.id), metadata=billing)
    assert recorded.referral.state == referral_pb2.REFERRAL_STATE_PENDING
    assert list(recorded.rewards) == []
    assert await balance(api, alice.id, alice_token) == {}
    await verify(api, bob.id, clock)  # the kept conversion qualifies the referral now
    assert await balance(api, alice.id, alice_token) == {"USD": (0, 1000, 0, 0)}
    await verify(api, bob.id, clock)  # evaluating again grants nothing twice
    assert [r.amount for r in await rewards(api, alice.id, alice_token)] == [1000]


async def test_conversions_of_users_nobody_referred_are_recorded(programme: tuple[Api, FakeClock]) -> None:
    api, _clock = programme
    carol = await api.register()
    billing = bearer(await service_token(api, "conversions:write"))
    recorded = await api.referral.RecordConversion(purchase(carol.id), metadata=billing)
    assert not recorded.HasField("referral")
    assert list(recorded.rewards) == []


async def test_concurrent_duplicates_grant_exactly_once(programme: tuple[Api, FakeClock]) -> None:
    api, clock = programme
    alice, alice_token, code = await referrer_and_code(api)
    bob, bob_token = await referee(api, code, verified=True, clock=clock)
    billing = bearer(await service_token(api, "conversions:write"))
    request = purchase(bob.id, "inv_dup")
    responses = await asyncio.gather(
        *(api.referral.RecordConversion(request, metadata=billing) for _ in range(50))
    )
    assert len({r.conversion.record_time.ToNanoseconds() for r in responses}) == 1
    assert {len(r.rewards) for r in responses} == {2}
    assert await balance(api, alice.id, alice_token) == {"USD": (0, 1000, 0, 0)}
    assert await balance(api, bob.id, bob_token) == {"USD": (0, 500, 0, 0)}
    # The same event_id with other values is refused; another service's ids are its own.
    changed = purchase(bob.id, "inv_dup")
    changed.value.units = 1
    await expect_error(
        api.referral.RecordConversion(changed, metadata=billing),
        grpc.StatusCode.ALREADY_EXISTS,
        "CONVERSION_EVENT_CONFLICT",
    )
    other = bearer(await service_token(api, "conversions:write"))
    theirs = await api.referral.RecordConversion(changed, metadata=other)
    assert list(theirs.rewards) == []  # the referral was already rewarded


async def test_the_referrers_caps_hold_under_concurrency(programme: tuple[Api, FakeClock]) -> None:
    api, clock = programme
    alice, alice_token, code = await referrer_and_code(api)
    referees = [(await referee(api, code, verified=True, clock=clock))[0] for _ in range(6)]
    billing = bearer(await service_token(api, "conversions:write"))
    await asyncio.gather(*(api.referral.RecordConversion(purchase(r.id), metadata=billing) for r in referees))
    mine = await rewards(api, alice.id, alice_token)
    assert len(mine) == 3  # referrer_monthly_cap = 3
    # Every referee still gets theirs.
    reader = bearer(await service_token(api, "rewards:read"))
    for user in referees:
        assert [r.role for r in await rewards(api, user.id, reader[0][1].split()[1])] == [Reward.ROLE_REFEREE]
    # Next month the cap starts afresh.
    clock.now += 32 * DAY
    late, _ = await referee(api, code, verified=True, clock=clock)
    await api.referral.RecordConversion(purchase(late.id), metadata=billing)
    assert len(await rewards(api, alice.id, alice_token)) == 4


async def test_who_may_call_what(programme: tuple[Api, FakeClock]) -> None:
    api, clock = programme
    alice, _alice_token, code = await referrer_and_code(api)
    bob, bob_token = await referee(api, code, verified=True, clock=clock)
    # Users cannot report conversions; services need conversions:write.
    await expect_error(
        api.referral.RecordConversion(purchase(bob.id), metadata=bearer(bob_token)),
        grpc.StatusCode.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    await expect_error(
        api.referral.RecordConversion(
            purchase(bob.id), metadata=bearer(await service_token(api, "rewards:read"))
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "SCOPE_MISSING",
    )
    # Users read their own rewards only; rewards:read reads anyone's.
    await expect_error(
        api.referral.ListRewards(
            referral_pb2.ListRewardsRequest(user_id=alice.id), metadata=bearer(bob_token)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    await expect_error(
        api.referral.GetRewardBalance(
            referral_pb2.GetRewardBalanceRequest(user_id=alice.id), metadata=bearer(bob_token)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    reader = await service_token(api, "rewards:read")
    assert await balance(api, alice.id, reader) == {}
    await expect_error(
        api.referral.GetRewardBalance(
            referral_pb2.GetRewardBalanceRequest(user_id=999_999), metadata=bearer(reader)
        ),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )


async def test_bad_requests_are_named(programme: tuple[Api, FakeClock]) -> None:
    api, _clock = programme
    billing = bearer(await service_token(api, "conversions:write"))
    user = await api.register()
    bad = referral_pb2.RecordConversionRequest(user_id=0, event_id="has space", kind="Purchase!")
    error = await expect_error(
        api.referral.RecordConversion(bad, metadata=billing),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    assert set(error.fields) == {"user_id", "event_id", "kind"}
    negative = purchase(user.id)
    negative.value.units = -5
    negative.value.currency_code = "usd"
    error = await expect_error(
        api.referral.RecordConversion(negative, metadata=billing), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(error.fields) == {"value", "value.currency_code"}
    future = purchase(user.id)
    future.occur_time.FromDatetime(utcnow() + DAY)
    error = await expect_error(
        api.referral.RecordConversion(future, metadata=billing), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(error.fields) == {"occur_time"}
    await expect_error(
        api.referral.RecordConversion(purchase(999_999), metadata=billing),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )
    await expect_error(
        api.referral.ReverseConversion(
            referral_pb2.ReverseConversionRequest(event_id="inv_never"), metadata=billing
        ),
        grpc.StatusCode.NOT_FOUND,
        "CONVERSION_NOT_FOUND",
    )
    error = await expect_error(
        api.referral.ReverseConversion(referral_pb2.ReverseConversionRequest(), metadata=billing),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(error.fields) == {"event_id"}
    error = await expect_error(
        api.referral.ListRewards(
            referral_pb2.ListRewardsRequest(user_id=user.id, page_size=-1, page_token="x"),
            metadata=bearer(await service_token(api, "rewards:read")),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(error.fields) == {"page_size"}


async def test_rewards_are_paginated(programme: tuple[Api, FakeClock]) -> None:
    api, clock = programme
    alice, alice_token, code = await referrer_and_code(api)
    billing = bearer(await service_token(api, "conversions:write"))
    for _ in range(3):
        user, _ = await referee(api, code, verified=True, clock=clock)
        await api.referral.RecordConversion(purchase(user.id), metadata=billing)
    seen: list[int] = []
    token = ""
    while True:
        page = await api.referral.ListRewards(
            referral_pb2.ListRewardsRequest(user_id=alice.id, page_size=2, page_token=token),
            metadata=bearer(alice_token),
        )
        seen += [r.id for r in page.rewards]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 3
    assert seen == sorted(seen, reverse=True)
    bob, bob_token = await api.user_with_token()
    await expect_error(
        api.referral.ListRewards(
            referral_pb2.ListRewardsRequest(user_id=bob.id, page_token=page.next_page_token or "bogus"),
            metadata=bearer(bob_token),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


@pytest.mark.one_stack
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[program]\nid = 'x'\n", "qualifying_kinds"),
        ("[program]\nid = 'x'\nqualifying_kinds = ['purchase']\n", "at least one of referrer_reward"),
        (
            "[program]\nid = 'x'\nqualifying_kinds = ['purchase']\n"
            "referrer_reward = {amount = -1, unit = 'USD'}\n",
            "referrer_reward.amount",
        ),
        ("[program]\nid = 'x'\nqualifying_kinds = ['purchase']\nholdx = 3\n", "program.holdx: unknown key"),
        ("not toml [", "not valid TOML"),
    ],
)
async def test_an_invalid_rules_file_stops_the_start_with_a_clear_error(
    stack: Stack, tmp_path: Path, text: str, needle: str
) -> None:
    with pytest.raises(StartupError) as raised:
        await start_api(stack, rewards_rules_file=rules_file(tmp_path, text))
    assert "REFERRAL_REWARDS_RULES_FILE" in str(raised.value)
    assert needle in str(raised.value)


SCREENING_RULES = RULES.replace(
    "referrer_lifetime_cap = 100", "referrer_lifetime_cap = 100\nvelocity_per_hour = 3"
)


def forwarded(address: str) -> tuple[tuple[str, str], ...]:
    return (("x-forwarded-for", address),)


async def test_each_fraud_signal_holds_a_referral_and_a_review_releases_it(
    stack: Stack, tmp_path: Path
) -> None:
    api = await start_api(
        stack,
        rewards_rules_file=rules_file(tmp_path, SCREENING_RULES),
        reject_disposable_emails=False,
        rate_limit_trusted_proxies=["127.0.0.0/8"],
    )
    clock = FakeClock()
    api.app.services.rewards.clock = clock
    try:
        billing = bearer(await service_token(api, "conversions:write"))
        reviewer = bearer(await service_token(api, "referrals:review"))
        tag = uuid.uuid4().hex[:6]

        async def referrer(email: str) -> str:
            await api.register(email)
            token = (await api.login(email)).access_token
            created = await api.referral.CreateReferralCode(
                referral_pb2.CreateReferralCodeRequest(ttl={"seconds": 86400}), metadata=bearer(token)
            )
            return created.referral_code.code

        async def converted(
            email: str, code: str, address: str = ""
        ) -> referral_pb2.RecordConversionResponse:
            user = await api.register(email, referral_code=code)
            if address:
                await api.auth.Login(
                    auth_pb2.LoginRequest(email=email, password=PASSWORD), metadata=forwarded(address)
                )
            await verify(api, user.id, clock)
            return await api.referral.RecordConversion(purchase(user.id), metadata=billing)

        # An alias of the referrer's own mailbox is refused at registration (SELF_REFERRAL),
        # before any signal could be recorded.
        alias_code = await referrer(f"al.ice.{tag}@gmail.com")
        await expect_error(
            api.register(f"alice{tag}+promo@googlemail.com", referral_code=alias_code),
            grpc.StatusCode.INVALID_ARGUMENT,
            "SELF_REFERRAL",
        )
        # A client address the referrer's session used (behind a trusted proxy).
        shared_email = f"sam-{tag}@example.com"
        shared_code = await referrer(shared_email)
        await api.auth.Login(
            auth_pb2.LoginRequest(email=shared_email, password=PASSWORD),
            metadata=forwarded("203.0.113.7"),
        )
        shared = await converted(f"sam-friend-{tag}@example.com", shared_code, "203.0.113.7")
        # A disposable domain.
        disposable_code = await referrer(f"dora-{tag}@example.com")
        disposable = await converted(f"dora-friend-{tag}@mailinator.com", disposable_code)
        # Velocity: the fourth referral within an hour on one referrer's codes (the limit is 3).
        busy_code = await referrer(f"vic-{tag}@example.com")
        busy = [await api.register(f"vic-{i}-{tag}@example.com", referral_code=busy_code) for i in range(4)]
        await verify(api, busy[-1].id, clock)
        fast = await api.referral.RecordConversion(purchase(busy[-1].id), metadata=billing)

        for response in (shared, disposable, fast):
            assert response.referral.held_for_review
            assert response.referral.state == referral_pb2.REFERRAL_STATE_QUALIFIED
            assert list(response.rewards) == []  # the rewards wait for the review

        held = await api.referral.ListReferralsForReview(
            referral_pb2.ListReferralsForReviewRequest(), metadata=reviewer
        )
        signals = {r.user_id: list(r.fraud_signals) for r in held.referrals}
        assert signals == {
            shared.referral.user_id: ["shared_client_address"],
            disposable.referral.user_id: ["disposable_domain"],
            fast.referral.user_id: ["velocity"],
        }

        # Approval releases the rewards (held for the programme's hold from now); rejection
        # ends the referral.
        approved = await api.referral.ReviewReferral(
            referral_pb2.ReviewReferralRequest(
                user_id=shared.referral.user_id,
                decision=referral_pb2.ReviewReferralRequest.DECISION_APPROVE,
                note="flatmates, checked",
            ),
            metadata=reviewer,
        )
        assert approved.referral.state == referral_pb2.REFERRAL_STATE_REWARDED
        assert not approved.referral.held_for_review
        assert approved.referral.review_note == "flatmates, checked"
        reader = await service_token(api, "rewards:read")
        assert await balance(api, shared.referral.referrer_id, reader) == {"USD": (0, 1000, 0, 0)}
        rejected = await api.referral.ReviewReferral(
            referral_pb2.ReviewReferralRequest(
                user_id=disposable.referral.user_id,
                decision=referral_pb2.ReviewReferralRequest.DECISION_REJECT,
            ),
            metadata=reviewer,
        )
        assert rejected.referral.state == referral_pb2.REFERRAL_STATE_REJECTED
        assert await balance(api, disposable.referral.referrer_id, reader) == {}
        # A reviewed referral is no longer held; another review is refused.
        await expect_error(
            api.referral.ReviewReferral(
                referral_pb2.ReviewReferralRequest(
                    user_id=disposable.referral.user_id,
                    decision=referral_pb2.ReviewReferralRequest.DECISION_APPROVE,
                ),
                metadata=reviewer,
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "REFERRAL_NOT_HELD",
        )
        left = await api.referral.ListReferralsForReview(
            referral_pb2.ListReferralsForReviewRequest(), metadata=reviewer
        )
        assert {r.user_id for r in left.referrals} == {fast.referral.user_id}
        # Only reviewers review.
        _, user_token = await api.user_with_token()
        await expect_error(
            api.referral.ListReferralsForReview(
                referral_pb2.ListReferralsForReviewRequest(), metadata=bearer(user_token)
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
        error = await expect_error(
            api.referral.ReviewReferral(referral_pb2.ReviewReferralRequest(user_id=1), metadata=reviewer),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert set(error.fields) == {"decision"}
        await expect_error(
            api.referral.ReviewReferral(
                referral_pb2.ReviewReferralRequest(
                    user_id=busy[0].id + 10_000, decision=referral_pb2.ReviewReferralRequest.DECISION_REJECT
                ),
                metadata=reviewer,
            ),
            grpc.StatusCode.NOT_FOUND,
            "REFERRAL_NOT_FOUND",
        )
    finally:
        await stop_api(api)


async def test_stats_and_the_leaderboard_equal_the_ledger_after_random_operations(
    programme: tuple[Api, FakeClock],
) -> None:
    api, clock = programme
    rng = random.Random(17)
    billing = bearer(await service_token(api, "conversions:write"))
    reader = await service_token(api, "rewards:read")
    referrers = [await referrer_and_code(api) for _ in range(3)]
    referees: list[tuple[int, int]] = []  # (referee id, referrer index)
    for _ in range(9):
        index = rng.randrange(len(referrers))
        user, _ = await referee(api, referrers[index][2], verified=rng.random() < 0.7, clock=clock)
        referees.append((user.id, index))
    events: list[str] = []
    for step in range(40):
        action = rng.random()
        if action < 0.5 or not events:
            referee_id, _ = rng.choice(referees)
            event = rng.choice(events) if events and rng.random() < 0.2 else f"ev_{step}"
            try:
                await api.referral.RecordConversion(purchase(referee_id, event), metadata=billing)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.ALREADY_EXISTS  # a repeated id, other user
            else:
                events.append(event)
        elif action < 0.75:
            await api.referral.ReverseConversion(
                referral_pb2.ReverseConversionRequest(event_id=rng.choice(events)), metadata=billing
            )
        elif action < 0.9:
            await verify(api, rng.choice(referees)[0], clock)
        else:
            clock.now += timedelta(days=rng.randrange(1, 20))

    board = await api.referral.ListTopReferrers(
        referral_pb2.ListTopReferrersRequest(
            period=referral_pb2.ListTopReferrersRequest.PERIOD_ALL_TIME, page_size=2
        ),
        metadata=bearer(reader),
    )
    entries = list(board.entries)
    if board.next_page_token:
        more = await api.referral.ListTopReferrers(
            referral_pb2.ListTopReferrersRequest(
                period=referral_pb2.ListTopReferrersRequest.PERIOD_ALL_TIME, page_token=board.next_page_token
            ),
            metadata=bearer(reader),
        )
        entries += list(more.entries)
    assert [e.rank for e in entries] == list(range(1, len(entries) + 1))
    assert [e.rewarded_referrals for e in entries] == sorted(
        (e.rewarded_referrals for e in entries), reverse=True
    )
    on_board = {e.referrer_id: e.rewarded_referrals for e in entries}
    assert on_board  # the sequence rewarded some referrals (and reversed others)

    for user, token, _code in referrers:
        stats = (
            await api.referral.GetReferralStats(
                referral_pb2.GetReferralStatsRequest(referrer_id=user.id), metadata=bearer(token)
            )
        ).stats
        listed = await api.referral.ListReferrals(
            referral_pb2.ListReferralsRequest(referrer_id=user.id), metadata=bearer(token)
        )
        states = [r.state for r in listed.referrals]
        assert stats.pending == states.count(referral_pb2.REFERRAL_STATE_PENDING)
        assert stats.qualified == states.count(referral_pb2.REFERRAL_STATE_QUALIFIED)
        assert stats.rewarded == states.count(referral_pb2.REFERRAL_STATE_REWARDED)
        assert stats.rejected == 0
        assert on_board.get(user.id, 0) == stats.rewarded
        ledger = await rewards(api, user.id, token)
        expected = {}
        for unit in {r.unit for r in ledger}:
            mine = [r for r in ledger if r.unit == unit]
            expected[unit] = (
                sum(r.amount for r in mine),
                sum(r.amount for r in mine if r.state == Reward.STATE_CANCELED),
                sum(r.amount for r in mine if r.state == Reward.STATE_CLAWED_BACK),
            )
        assert {t.unit: (t.granted, t.canceled, t.clawed_back) for t in stats.rewards} == expected
    # Reading another referrer's stats needs rewards:read.
    (first, _t, _c), (_second, second_token, _c2) = referrers[0], referrers[1]
    await expect_error(
        api.referral.GetReferralStats(
            referral_pb2.GetReferralStatsRequest(referrer_id=first.id), metadata=bearer(second_token)
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )


async def test_monthly_leaderboards(programme: tuple[Api, FakeClock]) -> None:
    api, clock = programme
    billing = bearer(await service_token(api, "conversions:write"))
    alice, alice_token, code = await referrer_and_code(api)
    for _ in range(2):
        bob, _ = await referee(api, code, verified=True, clock=clock)
        await api.referral.RecordConversion(purchase(bob.id), metadata=billing)
    period = referral_pb2.ListTopReferrersRequest

    async def board(which: int) -> list[tuple[int, int, int]]:
        response = await api.referral.ListTopReferrers(period(period=which), metadata=bearer(alice_token))
        return [(e.rank, e.referrer_id, e.rewarded_referrals) for e in response.entries]

    assert await board(period.PERIOD_CURRENT_MONTH) == [(1, alice.id, 2)]
    assert await board(period.PERIOD_UNSPECIFIED) == [(1, alice.id, 2)]
    assert await board(period.PERIOD_PREVIOUS_MONTH) == []
    clock.now += 32 * DAY
    assert await board(period.PERIOD_CURRENT_MONTH) == []
    assert await board(period.PERIOD_PREVIOUS_MONTH) == [(1, alice.id, 2)]
    assert await board(period.PERIOD_ALL_TIME) == [(1, alice.id, 2)]
    await expect_error(
        api.referral.ListTopReferrers(period(page_token="forged"), metadata=bearer(alice_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


def test_the_example_rules_file_is_valid() -> None:
    program = parse_rules((Path(__file__).parent.parent / "examples" / "rewards.toml").read_text())
    assert program.id == "launch-2026"
    assert program.hold == timedelta(days=14)


async def test_the_programme_over_http(programme: tuple[Api, FakeClock]) -> None:
    api, clock = programme
    alice, alice_token, code = await referrer_and_code(api)
    bob, _ = await referee(api, code, verified=True, clock=clock)
    billing = {"Authorization": f"Bearer {await service_token(api, 'conversions:write')}"}
    assert api.app.http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}", timeout=30) as http:
        recorded = await http.post(
            "/v1/conversions",
            json={
                "userId": str(bob.id),
                "eventId": "inv_http.1",
                "kind": "purchase",
                "value": {"currencyCode": "EUR", "units": "12", "nanos": 500000000},
            },
            headers=billing,
        )
        assert recorded.status_code == 200, recorded.text
        body = recorded.json()
        assert body["referral"]["state"] == "REFERRAL_STATE_REWARDED"
        assert {r["state"] for r in body["rewards"]} == {"STATE_HELD"}
        mine = {"Authorization": f"Bearer {alice_token}"}
        balance_ = await http.get(f"/v1/users/{alice.id}/reward-balance", headers=mine)
        assert balance_.json()["balances"] == [
            {"unit": "USD", "available": "0", "held": "1000", "canceled": "0", "clawedBack": "0"}
        ]
        reversed_ = await http.post("/v1/conversions/inv_http.1:reverse", json={}, headers=billing)
        assert reversed_.status_code == 200, reversed_.text
        assert {r["state"] for r in reversed_.json()["rewards"]} == {"STATE_CANCELED"}
        listed = await http.get(f"/v1/users/{alice.id}/rewards", headers=mine)
        assert [r["state"] for r in listed.json()["rewards"]] == ["STATE_CANCELED"]
        stats = await http.get(f"/v1/users/{alice.id}/referral-stats", headers=mine)
        assert stats.json()["stats"]["pending"] == "1"
        board = await http.get("/v1/referrers:top", params={"period": "PERIOD_ALL_TIME"}, headers=mine)
        assert board.status_code == 200, board.text
        bad = await http.post("/v1/conversions/bad%20id:reverse", json={}, headers=billing)
        assert bad.status_code == 400


async def test_the_programme_emits_its_events(programme: tuple[Api, FakeClock]) -> None:
    """Every step of the story is an event, in the transaction of its change and in order:
    verification, conversion, qualification, the rewards held, and the refund's corrections."""
    from referral.v1 import events_pb2

    from tests.test_events import all_events

    api, clock = programme
    alice, _alice_token, code = await referrer_and_code(api)
    bob, _ = await referee(api, code, verified=True, clock=clock)
    billing = bearer(await service_token(api, "conversions:write"))
    await api.referral.RecordConversion(purchase(bob.id, "inv_events_1"), metadata=billing)
    await api.referral.ReverseConversion(
        referral_pb2.ReverseConversionRequest(event_id="inv_events_1"), metadata=billing
    )
    found = [e for e in await all_events(api) if e.type not in ("user.registered", "referral_code.created")]
    assert [e.type for e in found] == [
        "referral.created",
        "user.email_verified",
        "conversion.recorded",
        "referral.qualified",
        "reward.held",
        "reward.held",
        "conversion.reversed",
        "reward.canceled",
        "reward.canceled",
    ]
    by_type: dict[str, list[events_pb2.Event]] = {}
    for event in found:
        by_type.setdefault(event.type, []).append(event)
    assert by_type["user.email_verified"][0].email_verified.user_id == bob.id
    recorded = by_type["conversion.recorded"][0].conversion_recorded
    assert (recorded.user_id, recorded.event_id, recorded.kind) == (bob.id, "inv_events_1", "purchase")
    qualified = by_type["referral.qualified"][0].referral_qualified
    assert (qualified.user_id, qualified.referrer_id) == (bob.id, alice.id)
    held = {(e.reward_held.user_id, e.reward_held.role, e.reward_held.amount) for e in by_type["reward.held"]}
    assert held == {(bob.id, "referee", 500), (alice.id, "referrer", 1000)}
    assert all(e.reward_held.unit == "USD" and e.reward_held.rule for e in by_type["reward.held"])
    canceled = {(e.reward_corrected.user_id, e.reward_corrected.amount) for e in by_type["reward.canceled"]}
    assert canceled == {(bob.id, -500), (alice.id, -1000)}
    assert all(e.reward_corrected.reward_id for e in by_type["reward.canceled"])
