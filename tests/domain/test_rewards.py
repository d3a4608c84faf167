"""The referral programme's domain on the in-memory twin of the Rewards port (the through-the-
wire tests on SQLite and PostgreSQL are tests/test_rewards.py): the same story, in milliseconds."""

from __future__ import annotations

from datetime import timedelta

import pytest

from referral_service.domain.errors import AlreadyExists, NotFound
from referral_service.domain.models import Money, ReferralState, RewardRole, RewardState
from referral_service.domain.rewards import Period, RecordConversionCommand, RewardService, parse_rules
from tests.domain.conftest import MakeDomain
from tests.domain.fakes import FakeClock

RULES = """
[program]
id = "p1"
qualifying_kinds = ["purchase"]
required_conversions = 2
hold_seconds = 86400
referrer_reward = { amount = 1000, unit = "USD" }
referee_reward = { amount = 10, unit = "points" }
referrer_lifetime_cap = 1
"""


async def test_the_story_on_the_memory_store(make_domain: MakeDomain, clock: FakeClock) -> None:
    domain = make_domain()
    rewards = RewardService(domain.store, parse_rules(RULES), page_secret=b"s" * 32, clock=clock)
    alice = await domain.register()
    code = await domain.code(alice)
    bob = await domain.register(referral_code=code.code)
    carol = await domain.register(referral_code=code.code)
    for user in (bob, carol):
        domain.store.set_verified(user.id)

    def purchase(user_id: int, event: str) -> RecordConversionCommand:
        return RecordConversionCommand(
            source=7, user_id=user_id, event_id=event, kind="purchase", value=Money("USD", 5)
        )

    first = await rewards.record_conversion(purchase(bob.id, "e1"))
    assert first.referral is not None
    assert first.referral.state is ReferralState.PENDING  # two purchases are required
    second = await rewards.record_conversion(purchase(bob.id, "e2"))
    assert second.referral is not None
    assert second.referral.state is ReferralState.REWARDED
    assert {(r.role, r.amount, r.unit) for r in second.rewards} == {
        (RewardRole.REFERRER, 1000, "USD"),
        (RewardRole.REFEREE, 10, "points"),
    }
    assert (await rewards.record_conversion(purchase(bob.id, "e2"))).conversion.id == second.conversion.id
    with pytest.raises(AlreadyExists):
        await rewards.record_conversion(purchase(carol.id, "e2"))
    # The lifetime cap of 1: Carol's referral rewards Carol only.
    await rewards.record_conversion(purchase(carol.id, "e3"))
    third = await rewards.record_conversion(purchase(carol.id, "e4"))
    assert [r.role for r in third.rewards] == [RewardRole.REFEREE]

    [usd] = await rewards.balance(alice.id, alice.id)
    assert (usd.unit, usd.available, usd.held) == ("USD", 0, 1000)
    clock.advance(days=1, seconds=1)
    [usd] = await rewards.balance(alice.id, alice.id)
    assert (usd.available, usd.held) == (1000, 0)
    reversed_ = await rewards.reverse_conversion(7, "e2")
    assert {r.state(clock()) for r in reversed_.rewards} == {RewardState.CLAWED_BACK}
    with pytest.raises(NotFound):
        await rewards.reverse_conversion(7, "e404")

    stats = await rewards.stats(alice.id, alice.id)
    assert (stats.pending, stats.qualified, stats.rewarded) == (1, 0, 1)
    assert [(t.unit, t.granted, t.clawed_back) for t in stats.rewards] == [("USD", 1000, 1000)]
    board, _ = await rewards.top_referrers(Period.ALL_TIME, 0, "")
    assert [(e.rank, e.referrer_id, e.rewarded_referrals) for e in board] == [(1, alice.id, 1)]
    page = await rewards.list_rewards(alice.id, alice.id, 0, "")
    assert [r.state(clock()) for r in page.rewards] == [RewardState.CLAWED_BACK]
    clock.advance(timedelta(days=40))
    board, _ = await rewards.top_referrers(Period.PREVIOUS_MONTH, 0, "")
    assert len(board) <= 1
