"""The enrichment worker: every provider outcome, retries with back-off, leases between two
workers, and hand-back on shutdown. The worker runs its real loop (polling every 10 ms of real
time); the job times follow the fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest

from referral_service.domain.enrichment import EnrichmentWorker
from referral_service.domain.models import Profile, ProfileState, User
from referral_service.domain.ports import PersonData, ProfileClaim, ProfileLookup, ProfileOutcome
from tests.domain.conftest import Domain, MakeDomain
from tests.domain.fakes import FakeProvider

LEASE = timedelta(minutes=5)
BACKOFF = timedelta(seconds=10)
BACKOFF_MAX = timedelta(seconds=60)
MILLISECOND = timedelta(milliseconds=1)
ADA = PersonData(full_name="Ada Lovelace", company="Analytical Engines", title="Programmer")


@pytest.fixture
def domain(make_domain: MakeDomain) -> Domain:
    return make_domain(enrichment=True)


@asynccontextmanager
async def running(domain: Domain, provider: FakeProvider, **options: Any) -> AsyncIterator[EnrichmentWorker]:
    settings: dict[str, Any] = {
        "max_attempts": 3,
        "retry_backoff": BACKOFF,
        "retry_max": BACKOFF_MAX,
        "concurrency": 2,
        "poll_seconds": 0.01,
        "lease": LEASE,
        "clock": domain.clock,
    }
    settings.update(options)
    worker = EnrichmentWorker(domain.store, provider, **settings)
    worker.start()
    try:
        yield worker
    finally:
        await worker.stop(grace=5)


async def until(condition: Callable[[], Awaitable[bool]]) -> None:
    """Wait for the worker's loop to get there, looking at the store between its steps
    (bounded, so a bug fails instead of hanging)."""
    async with asyncio.timeout(10):
        while not await condition():  # noqa: ASYNC110 - the state is in the store, not an event
            await asyncio.sleep(0.005)


async def profile(domain: Domain, user: User) -> Profile | None:
    async with domain.store.read() as uow:
        stored = await uow.users.get(user.id)
    assert stored is not None
    return stored.profile


def finished(domain: Domain, user: User) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        current = await profile(domain, user)
        return current is not None and current.state is not ProfileState.PENDING

    return check


def rescheduled(domain: Domain, provider: FakeProvider, attempts: int) -> Callable[[], Awaitable[bool]]:
    """The ``attempts``-th lookup happened and its retry is scheduled (no longer leased)."""

    async def check() -> bool:
        async with domain.store.read() as uow:
            due = await uow.profiles.next_due_time()
        now = domain.clock()
        return len(provider.calls) == attempts and due is not None and now < due < now + LEASE

    return check


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            ProfileLookup(ProfileOutcome.FOUND, ADA),
            Profile(
                ProfileState.FOUND, full_name="Ada Lovelace", company="Analytical Engines", title="Programmer"
            ),
        ),
        (ProfileLookup(ProfileOutcome.FOUND, PersonData()), Profile(ProfileState.NOT_FOUND)),
        (ProfileLookup(ProfileOutcome.NOT_FOUND), Profile(ProfileState.NOT_FOUND)),
        (ProfileLookup(ProfileOutcome.FAILED, detail="rejected"), Profile(ProfileState.FAILED)),
    ],
)
async def test_one_lookup_and_its_outcome(domain: Domain, answer: ProfileLookup, expected: Profile) -> None:
    user = await domain.verified()
    provider = FakeProvider(answer)
    async with running(domain, provider):
        await until(finished(domain, user))
    assert await profile(domain, user) == Profile(
        state=expected.state,
        full_name=expected.full_name,
        company=expected.company,
        title=expected.title,
        source="fake-provider",
        fetch_time=domain.clock(),
    )
    assert provider.calls == [user.email]


async def test_a_transient_failure_is_retried_after_a_back_off(domain: Domain) -> None:
    user = await domain.verified()
    provider = FakeProvider(
        ProfileLookup(ProfileOutcome.RETRY, detail="timeout"), ProfileLookup(ProfileOutcome.FOUND, ADA)
    )
    async with running(domain, provider):
        await until(rescheduled(domain, provider, 1))
        async with domain.store.read() as uow:
            due = await uow.profiles.next_due_time()
        assert due is not None
        # BACKOFF, give or take the 20 % jitter.
        assert BACKOFF * 0.8 - MILLISECOND <= due - domain.clock() <= BACKOFF * 1.2 + MILLISECOND
        domain.clock.advance(BACKOFF * 1.3)
        await until(finished(domain, user))
    current = await profile(domain, user)
    assert current is not None
    assert current.state is ProfileState.FOUND
    assert len(provider.calls) == 2


async def test_a_provider_error_counts_as_a_transient_failure(domain: Domain) -> None:
    user = await domain.verified()
    provider = FakeProvider(RuntimeError("provider bug"), ProfileLookup(ProfileOutcome.NOT_FOUND))
    async with running(domain, provider):
        await until(rescheduled(domain, provider, 1))
        domain.clock.advance(BACKOFF * 1.3)
        await until(finished(domain, user))
    assert await profile(domain, user) == Profile(
        ProfileState.NOT_FOUND, source="fake-provider", fetch_time=domain.clock()
    )


@pytest.mark.parametrize(("retry_after", "wait"), [(40, timedelta(seconds=40)), (3600, BACKOFF_MAX)])
async def test_retry_after_from_the_provider_is_honoured_up_to_the_cap(
    domain: Domain, retry_after: float, wait: timedelta
) -> None:
    await domain.verified()
    provider = FakeProvider(ProfileLookup(ProfileOutcome.RETRY, retry_after_seconds=retry_after))
    async with running(domain, provider):
        await until(rescheduled(domain, provider, 1))
        async with domain.store.read() as uow:
            assert await uow.profiles.next_due_time() == domain.clock() + wait


async def test_the_last_attempt_fails_for_good(domain: Domain) -> None:
    user = await domain.verified()
    provider = FakeProvider(ProfileLookup(ProfileOutcome.RETRY, detail="quota"))
    async with running(domain, provider, max_attempts=2):
        await until(rescheduled(domain, provider, 1))
        domain.clock.advance(BACKOFF * 1.3)
        await until(finished(domain, user))
    assert await profile(domain, user) == Profile(
        ProfileState.FAILED, source="fake-provider", fetch_time=domain.clock()
    )
    assert len(provider.calls) == 2


async def test_two_workers_never_run_one_lookup_twice(domain: Domain) -> None:
    users = [await domain.verified() for _ in range(4)]
    provider = FakeProvider(ProfileLookup(ProfileOutcome.NOT_FOUND))
    async with running(domain, provider), running(domain, provider):
        for user in users:
            await until(finished(domain, user))
    assert sorted(provider.calls) == sorted(user.email for user in users)


async def test_stopping_hands_unfinished_lookups_back(domain: Domain) -> None:
    user = await domain.verified()
    provider = FakeProvider(ProfileLookup(ProfileOutcome.FOUND, ADA))
    provider.hold = asyncio.Event()  # the lookup never returns
    worker = EnrichmentWorker(
        domain.store,
        provider,
        max_attempts=3,
        retry_backoff=BACKOFF,
        retry_max=BACKOFF_MAX,
        concurrency=1,
        poll_seconds=0.01,
        lease=LEASE,
        clock=domain.clock,
    )
    worker.start()
    await asyncio.wait_for(provider.called.wait(), 10)
    await worker.stop(grace=0)
    # Due again at once, and the interrupted attempt is not counted.
    async with domain.store.read() as uow:
        assert await uow.profiles.due(domain.clock(), 10) == [user.id]
    claim = await domain.store.transact(
        lambda uow: uow.profiles.claim(user.id, domain.clock(), domain.clock() + LEASE)
    )
    assert claim == ProfileClaim(email=user.email, attempts=1)
