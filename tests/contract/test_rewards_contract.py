"""The ``Rewards`` port's contract, run against every adapter (memory, SQLite, PostgreSQL):
conversions unique per (source, event id), one correction per grant, compare-and-set of
referral states, capped counters that hold under concurrency, the leaderboard's order."""

from __future__ import annotations

import asyncio

import pytest

from referral_service.domain.models import GRANT, ReferralState, RewardRole, RewardState
from referral_service.domain.ports import (
    CONVERSION_TAKEN,
    REWARD_CORRECTED,
    Conflict,
    NewConversion,
    NewRewardEntry,
    Store,
    UnitOfWork,
)
from tests.contract.test_store_contract import T0, N, add_user, at, backend, read, store  # noqa: F401

pytestmark = pytest.mark.usefixtures("backend")


def conversion(user_id: int, event_id: str = "e1", source: int = 1) -> NewConversion:
    return NewConversion(
        source=source, event_id=event_id, fingerprint="f", user_id=user_id, kind="purchase", occur_time=T0
    )


async def test_conversions_are_unique_per_source_and_event_id(store: Store) -> None:  # noqa: F811
    user = await add_user(store, "c@example.com")
    first = await store.transact(lambda uow: uow.rewards.add_conversion(conversion(user.id), T0))
    with pytest.raises(Conflict) as raised:
        await store.transact(lambda uow: uow.rewards.add_conversion(conversion(user.id), T0))
    assert raised.value.constraint == CONVERSION_TAKEN
    other = await store.transact(lambda uow: uow.rewards.add_conversion(conversion(user.id, source=2), T0))
    assert other.id != first.id
    found = await read(store, lambda uow: uow.rewards.conversion(1, "e1"))
    assert found is not None
    assert (found.id, found.occur_time) == (first.id, T0)
    assert await read(store, lambda uow: uow.rewards.qualifying(user.id, ["purchase"])) == (2, other.id)
    assert await store.transact(lambda uow: uow.rewards.reverse_conversion(first.id, at(1)))
    assert not await store.transact(lambda uow: uow.rewards.reverse_conversion(first.id, at(2)))
    assert await read(store, lambda uow: uow.rewards.qualifying(user.id, ["purchase"])) == (1, other.id)


async def test_referral_states_move_by_compare_and_set(store: Store) -> None:  # noqa: F811
    referrer = await add_user(store, "r@example.com")
    referee = await add_user(store, "e@example.com", referrer_id=referrer.id)

    async def ensure(uow: UnitOfWork) -> None:
        await uow.rewards.ensure_referral(referee.id, referrer.id, T0)
        await uow.rewards.ensure_referral(referee.id, referrer.id, at(5))  # no change

    await store.transact(ensure)
    status = await read(store, lambda uow: uow.rewards.referral(referee.id))
    assert status is not None
    assert (status.state, status.create_time, status.screened) == (ReferralState.PENDING, T0, False)
    moves = await asyncio.gather(
        *(
            store.transact(
                lambda uow: uow.rewards.move_referral(
                    referee.id, [ReferralState.PENDING], ReferralState.QUALIFIED, at(1)
                )
            )
            for _ in range(N)
        )
    )
    assert sorted(moves) == [False] * (N - 1) + [True]
    await store.transact(lambda uow: uow.rewards.record_signals(referee.id, ["velocity"], at(2)))
    held = await read(store, lambda uow: uow.rewards.held_page(0, 10))
    assert [(h.referee_id, h.signals, h.state) for h in held] == [
        (referee.id, ("velocity",), ReferralState.QUALIFIED)
    ]
    assert await store.transact(lambda uow: uow.rewards.review_referral(referee.id, "approved", "ok", at(3)))
    assert not await store.transact(
        lambda uow: uow.rewards.review_referral(referee.id, "rejected", "", at(4))
    )
    assert await read(store, lambda uow: uow.rewards.held_page(0, 10)) == []


async def test_a_grant_has_at_most_one_correction(store: Store) -> None:  # noqa: F811
    referrer = await add_user(store, "r2@example.com")
    referee = await add_user(store, "e2@example.com", referrer_id=referrer.id)
    grant = NewRewardEntry(
        kind=GRANT,
        user_id=referrer.id,
        referee_id=referee.id,
        role=RewardRole.REFERRER,
        amount=1000,
        unit="USD",
        rule="p/referrer",
        conversion_id=None,
        available_time=at(100),
    )
    [grant_id] = await store.transact(lambda uow: uow.rewards.add_entries([grant], T0))
    [reward] = await read(store, lambda uow: uow.rewards.rewards_of(referrer.id))
    assert reward.state(at(99)) is RewardState.HELD
    assert reward.state(at(100)) is RewardState.AVAILABLE
    cancel = NewRewardEntry(
        kind="cancel",
        user_id=referrer.id,
        referee_id=referee.id,
        role=RewardRole.REFERRER,
        amount=-1000,
        unit="USD",
        rule="p/referrer",
        conversion_id=None,
        corrects_id=grant_id,
    )
    outcomes = await asyncio.gather(
        *(store.transact(lambda uow: uow.rewards.add_entries([cancel], at(1))) for _ in range(N)),
        return_exceptions=True,
    )
    conflicts = [o for o in outcomes if isinstance(o, Conflict)]
    assert len(conflicts) == N - 1
    assert {c.constraint for c in conflicts} == {REWARD_CORRECTED}
    [reward] = await read(store, lambda uow: uow.rewards.rewards_page(referrer.id, 0, 10))
    assert (reward.state(at(200)), reward.correct_time) == (RewardState.CANCELED, at(1))


async def test_capped_counters_hold_under_concurrency_and_rank_the_board(store: Store) -> None:  # noqa: F811
    users = [await add_user(store, f"b{i}@example.com") for i in range(3)]
    granted = await asyncio.gather(
        *(
            store.transact(lambda uow: uow.rewards.bump(users[0].id, "all", "grants", 1, cap=3))
            for _ in range(N)
        )
    )
    assert sum(granted) == 3
    assert not await store.transact(lambda uow: uow.rewards.bump(users[1].id, "all", "grants", 1, cap=0))
    for user, value in zip(users, (2, 5, 2), strict=True):
        await store.transact(
            lambda uow, user=user, value=value: uow.rewards.bump(user.id, "all", "rewarded", value)
        )
    await store.transact(lambda uow: uow.rewards.bump(users[1].id, "all", "rewarded", -1))
    counters = await read(store, lambda uow: uow.rewards.counters(users[0].id, "all"))
    assert counters == {"grants": 3, "rewarded": 2}
    board = await read(store, lambda uow: uow.rewards.top("all", "rewarded", None, 2))
    assert board == [(users[1].id, 4), (users[0].id, 2)]
    rest = await read(store, lambda uow: uow.rewards.top("all", "rewarded", (2, users[0].id), 2))
    assert rest == [(users[2].id, 2)]
