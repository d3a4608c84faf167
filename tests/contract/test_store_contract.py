"""One contract for the ``Store`` port, run against every adapter: ``MemoryStore`` and
``SqlStore`` on SQLite and on PostgreSQL. Whatever passes here may back the domain.

Times are fixed (the store is always told "now"), so boundaries are exact: a code or token
whose expire_time equals now is dead, a code whose use_count equals max_uses is used up.
Concurrency tests run N transactions at once with ``asyncio.gather``; they assert outcomes,
never timings.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import pytest

from referral_service.domain import ports
from referral_service.domain.models import EventDraft, Profile, ProfileState, ReferralCode, User
from referral_service.domain.ports import (
    CODE_TAKEN,
    EMAIL_TAKEN,
    OPEN_CODE_EXISTS,
    REQUEST_ID_TAKEN,
    Conflict,
    NewCode,
    NewUser,
    PersonData,
    ProfileClaim,
    Store,
    UnitOfWork,
)
from referral_service.memory.store import MemoryStore
from tests.conftest import _need, truncate_postgres

T = TypeVar("T")

T0 = datetime(2031, 3, 14, 9, 26, 53, 589793, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
#: Concurrent callers in the concurrency tests.
N = 8


def at(seconds: float = 0) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """``memory``, or the URL of a migrated, empty database. A plain fixture: the session-wide
    database fixtures it asks for run migrations with ``asyncio.run``, outside the test's loop
    (and only for the backends that need them)."""
    if request.param == "memory":
        return "memory"
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "referral.db"
        shutil.copy(template, path)
        return f"sqlite+aiosqlite:///{path}"
    postgres: str | None = request.getfixturevalue("postgres_database")
    _need("PostgreSQL", postgres is not None)
    assert postgres is not None
    return postgres


@pytest.fixture
async def store(backend: str) -> AsyncIterator[Store]:
    if backend == "memory":
        yield MemoryStore()
        return
    from referral_service.storage.db import Database
    from referral_service.storage.store import SqlStore

    if backend.startswith("postgresql"):
        await truncate_postgres(backend)
    database = Database(backend)
    try:
        yield SqlStore(database)
    finally:
        await database.dispose()


# --- helpers --------------------------------------------------------------------------------------


async def read(store: Store, query: Callable[[UnitOfWork], Awaitable[T]]) -> T:
    async with store.read() as uow:
        return await query(uow)


def new_user(email: str, **fields: Any) -> NewUser:
    return NewUser(email=email, email_key=email.lower(), password_hash=f"hash:{email}", **fields)


async def add_user(store: Store, email: str, now: datetime = T0, **fields: Any) -> User:
    return await store.transact(lambda uow: uow.users.add(new_user(email, **fields), now))


async def add_code(
    store: Store,
    owner: User,
    code: str,
    *,
    expire_time: datetime | None = None,
    max_uses: int = 0,
    now: datetime = T0,
) -> ReferralCode:
    new = NewCode(
        code=code,
        code_key=code.lower(),
        owner_id=owner.id,
        expire_time=expire_time or at(3600),
        max_uses=max_uses,
    )
    return await store.transact(lambda uow: uow.codes.add(new, now))


async def add_session(
    store: Store,
    user: User,
    session_id: str,
    jti: str,
    expire_time: datetime | None = None,
    now: datetime = T0,
) -> None:
    await store.transact(
        lambda uow: uow.sessions.add(
            session_id=session_id,
            user_id=user.id,
            refresh_jti=jti,
            now=now,
            expire_time=expire_time or at(3600),
        )
    )


async def rotate(
    store: Store,
    user: User,
    session_id: str,
    jti: str,
    new_jti: str,
    now: datetime,
    expire_time: datetime | None = None,
) -> bool:
    return await store.transact(
        lambda uow: uow.sessions.rotate(
            session_id=session_id,
            user_id=user.id,
            refresh_jti=jti,
            new_jti=new_jti,
            now=now,
            expire_time=expire_time or at(3600),
        )
    )


async def conflict_of(work: Awaitable[object]) -> str:
    with pytest.raises(Conflict) as caught:
        await work
    return caught.value.constraint


def outcomes(results: list[Any]) -> list[Any]:
    """Results of gathered calls, with each Conflict replaced by its constraint name."""
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, Conflict):
            raise result
    return [result.constraint if isinstance(result, Conflict) else result for result in results]


# --- store and transactions -----------------------------------------------------------------------


async def test_ping(store: Store) -> None:
    assert await store.ping() is True


async def test_transact_returns_the_result_of_work_and_commits(store: Store) -> None:
    user = await add_user(store, "ada@example.com")
    assert await read(store, lambda uow: uow.users.get(user.id)) == user


async def test_an_exception_rolls_back_every_write_and_propagates(store: Store) -> None:
    referrer = await add_user(store, "referrer@example.com")
    code = await add_code(store, referrer, "Before1")
    boom = RuntimeError("boom")

    async def work(uow: UnitOfWork) -> None:
        user = await uow.users.add(new_user("gone@example.com", referrer_id=referrer.id), T0)
        await uow.users.count_referral(referrer.id)
        assert await uow.codes.claim_use(code.id, T0)
        await uow.codes.revoke_open(referrer.id, T0)
        await uow.codes.add(NewCode("Gone1", "gone1", user.id, at(60), 0), T0)
        await uow.users.set_password_hash(referrer.id, "changed", T0)
        await uow.sessions.add(
            session_id="s-gone", user_id=user.id, refresh_jti="j-gone", now=T0, expire_time=at(60)
        )
        await uow.sessions.add_revocations([("jti:gone", at(60))])
        await uow.requests.remember(
            scope="register",
            request_id="r-gone",
            fingerprint="f",
            resource_id=user.id,
            now=T0,
            expire_time=at(60),
        )
        await uow.profiles.add_job(user.id, T0)
        raise boom

    with pytest.raises(RuntimeError) as caught:
        await store.transact(work)
    assert caught.value is boom

    async with store.read() as uow:
        assert await uow.users.by_email_key("gone@example.com") is None
        assert await uow.users.credentials("gone@example.com") is None
        assert (await uow.users.credentials("referrer@example.com")) == ports.Credentials(
            referrer.id, "hash:referrer@example.com", True
        )
        assert await uow.referrals.count(referrer.id) == 0
        assert await uow.referrals.page(referrer.id, 0, 10) == []
        assert await uow.codes.get(code.id) == code
        assert await uow.codes.open_code(referrer.id) == code
        assert await uow.codes.by_key("gone1") is None
        assert await uow.sessions.get("s-gone") is None
        assert not await uow.sessions.any_revoked(["jti:gone"], T0)
        assert await uow.requests.get("register", "r-gone", T0) is None
        assert await uow.profiles.due(at(60), 10) == []


async def test_a_conflict_rolls_back_the_whole_transaction(store: Store) -> None:
    await add_user(store, "taken@example.com")

    async def work(uow: UnitOfWork) -> None:
        await uow.users.add(new_user("first@example.com"), T0)
        await uow.users.add(new_user("taken@example.com"), T0)

    assert await conflict_of(store.transact(work)) == EMAIL_TAKEN
    assert await read(store, lambda uow: uow.users.by_email_key("first@example.com")) is None
    # The store is usable afterwards.
    assert (await add_user(store, "first@example.com")).email == "first@example.com"


async def test_reads_see_committed_data_only(store: Store) -> None:
    written = asyncio.Event()
    release = asyncio.Event()

    async def work(uow: UnitOfWork) -> User:
        user = await uow.users.add(new_user("pending@example.com"), T0)
        written.set()
        await release.wait()
        return user

    task = asyncio.create_task(store.transact(work))
    await written.wait()
    assert await read(store, lambda uow: uow.users.by_email_key("pending@example.com")) is None
    release.set()
    user = await task
    assert await read(store, lambda uow: uow.users.by_email_key("pending@example.com")) == user


async def test_a_cancelled_caller_leaves_all_or_nothing_and_the_store_usable(store: Store) -> None:
    written = asyncio.Event()
    release = asyncio.Event()

    async def work(uow: UnitOfWork) -> None:
        await uow.users.add(new_user("one@example.com"), T0)
        written.set()
        await release.wait()
        await uow.users.add(new_user("two@example.com"), T0)

    task = asyncio.create_task(store.transact(work))
    await written.wait()
    task.cancel()
    release.set()  # an adapter that lets the transaction finish may now do so
    with pytest.raises(asyncio.CancelledError):
        await task
    async with store.read() as uow:
        one = await uow.users.by_email_key("one@example.com")
        two = await uow.users.by_email_key("two@example.com")
    assert (one is None) == (two is None)
    assert (await add_user(store, "three@example.com")).email == "three@example.com"


async def test_times_are_kept_to_the_microsecond_and_read_back_in_utc(store: Store) -> None:
    plus_five = timezone(timedelta(hours=5))
    now = at(0.5).astimezone(plus_five)
    user = await add_user(store, "tz@example.com", now=now)
    code = await add_code(store, user, "Tz1", expire_time=at(7200).astimezone(plus_five), now=now)
    assert (user.create_time, code.create_time, code.expire_time) == (at(0.5), at(0.5), at(7200))
    async with store.read() as uow:
        stored_user = await uow.users.get(user.id)
        stored_code = await uow.codes.get(code.id)
    assert stored_user is not None
    assert stored_code is not None
    for value, expected in (
        (stored_user.create_time, at(0.5)),
        (stored_code.create_time, at(0.5)),
        (stored_code.expire_time, at(7200)),
    ):
        assert value == expected
        assert value.utcoffset() == timedelta(0)


# --- users ----------------------------------------------------------------------------------------


async def test_add_user_and_read_it_back(store: Store) -> None:
    referrer = await add_user(store, "ref@example.com")
    user = await add_user(
        store,
        "Ada@example.com",
        referrer_id=referrer.id,
        is_verified=True,
        email_verification="valid",
        email_verify_time=at(-1),
    )
    assert user.id > referrer.id
    assert (user.email, user.is_active, user.is_verified, user.is_superuser) == (
        "Ada@example.com",
        True,
        True,
        False,
    )
    assert user.referrer_id == referrer.id
    assert user.create_time == T0
    assert user.email_verification is not None
    assert user.email_verification.value == "valid"
    assert user.email_verify_time == at(-1)
    assert user.profile is None
    assert referrer.email_verification is None
    assert referrer.email_verify_time is None
    assert referrer.is_verified is False
    async with store.read() as uow:
        assert await uow.users.get(user.id) == user
        assert await uow.users.by_email_key("ada@example.com") == user
        assert await uow.users.credentials("ada@example.com") == ports.Credentials(
            user.id, "hash:Ada@example.com", True
        )
        assert await uow.users.get(user.id + 1000) is None
        assert await uow.users.by_email_key("nobody@example.com") is None
        assert await uow.users.credentials("nobody@example.com") is None


async def test_user_ids_increase(store: Store) -> None:
    ids = [(await add_user(store, f"u{i}@example.com")).id for i in range(4)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 4


async def test_email_key_is_unique(store: Store) -> None:
    await add_user(store, "bob@example.com")
    assert await conflict_of(add_user(store, "BOB@example.com")) == EMAIL_TAKEN


async def test_concurrent_registrations_of_one_email_make_one_account(store: Store) -> None:
    results = await asyncio.gather(
        *(add_user(store, "race@example.com") for _ in range(N)), return_exceptions=True
    )
    made = outcomes(list(results))
    assert sum(isinstance(result, User) for result in made) == 1
    assert made.count(EMAIL_TAKEN) == N - 1


async def test_set_password_hash(store: Store) -> None:
    user = await add_user(store, "pw@example.com")
    await store.transact(lambda uow: uow.users.set_password_hash(user.id, "new-hash", at(1)))
    credentials = await read(store, lambda uow: uow.users.credentials("pw@example.com"))
    assert credentials == ports.Credentials(user.id, "new-hash", True)


async def test_make_superuser(store: Store) -> None:
    user = await add_user(store, "root@example.com")
    promoted = await store.transact(lambda uow: uow.users.make_superuser(user.id, at(1)))
    assert promoted is not None
    assert promoted.is_superuser is True
    assert promoted.id == user.id
    assert promoted.email == user.email
    stored = await read(store, lambda uow: uow.users.get(user.id))
    assert stored is not None
    assert stored.is_superuser is True
    assert await store.transact(lambda uow: uow.users.make_superuser(user.id + 1000, at(1))) is None


async def test_add_superuser(store: Store) -> None:
    user = await add_user(store, "admin@example.com", is_superuser=True)
    assert user.is_superuser is True


# --- referral codes -------------------------------------------------------------------------------


async def test_add_code_and_read_it_back(store: Store) -> None:
    owner = await add_user(store, "owner@example.com")
    code = await add_code(store, owner, "Spring24", max_uses=5, expire_time=at(600))
    assert (code.code, code.owner_id, code.max_uses, code.use_count) == ("Spring24", owner.id, 5, 0)
    assert (code.create_time, code.expire_time, code.revoke_time) == (T0, at(600), None)
    async with store.read() as uow:
        assert await uow.codes.get(code.id) == code
        assert await uow.codes.by_key("spring24") == code
        assert await uow.codes.open_code(owner.id) == code
        assert await uow.codes.live_by_email_key("owner@example.com", T0) == code
        assert await uow.codes.get(code.id + 1000) is None
        assert await uow.codes.by_key("nothing") is None
        assert await uow.codes.open_code(owner.id + 1000) is None


async def test_code_key_is_unique_forever(store: Store) -> None:
    first = await add_user(store, "first@example.com")
    second = await add_user(store, "second@example.com")
    await add_code(store, first, "Shared")
    assert await conflict_of(add_code(store, second, "SHARED")) == CODE_TAKEN
    # Still taken after the code is revoked and closed.
    await store.transact(lambda uow: uow.codes.revoke_open(first.id, at(1)))
    assert await conflict_of(add_code(store, second, "shared")) == CODE_TAKEN
    assert await conflict_of(add_code(store, first, "shared")) == CODE_TAKEN
    # ...and after it expired and was closed.
    expiring = await add_code(store, second, "Expiring", expire_time=at(10))
    await store.transact(lambda uow: uow.codes.close_dead(second.id, at(10)))
    assert await read(store, lambda uow: uow.codes.open_code(second.id)) is None
    assert await conflict_of(add_code(store, first, "EXPIRING")) == CODE_TAKEN
    assert await read(store, lambda uow: uow.codes.by_key("expiring")) == expiring


async def test_one_open_code_per_owner_even_when_dead(store: Store) -> None:
    owner = await add_user(store, "one@example.com")
    await add_code(store, owner, "First1", expire_time=at(10))
    assert await conflict_of(add_code(store, owner, "Second1")) == OPEN_CODE_EXISTS
    # Expired but not closed: still open, still in the way.
    assert await conflict_of(add_code(store, owner, "Second1", now=at(20))) == OPEN_CODE_EXISTS
    assert await read(store, lambda uow: uow.codes.by_key("second1")) is None


async def test_a_taken_code_key_is_reported_before_the_open_slot(store: Store) -> None:
    """One answer on every backend (SQLite by itself would name the open slot)."""
    owner = await add_user(store, "both@example.com")
    code = await add_code(store, owner, "Both1")
    assert await conflict_of(add_code(store, owner, "both1")) == CODE_TAKEN
    assert await read(store, lambda uow: uow.codes.open_code(owner.id)) == code


async def test_concurrent_creations_leave_one_open_code(store: Store) -> None:
    owner = await add_user(store, "racer@example.com")
    results = await asyncio.gather(
        *(add_code(store, owner, f"Race{i}") for i in range(N)), return_exceptions=True
    )
    made = outcomes(list(results))
    codes = [result for result in made if isinstance(result, ReferralCode)]
    assert len(codes) == 1
    assert made.count(OPEN_CODE_EXISTS) == N - 1
    assert await read(store, lambda uow: uow.codes.open_code(owner.id)) == codes[0]


async def test_live_rule_at_the_expiry_boundary(store: Store) -> None:
    owner = await add_user(store, "exp@example.com")
    code = await add_code(store, owner, "Exp1", expire_time=at(60))
    async with store.read() as uow:
        assert await uow.codes.live_by_email_key("exp@example.com", at(60) - MICROSECOND) == code
        assert await uow.codes.live_by_email_key("exp@example.com", at(60)) is None
        assert await uow.codes.live_by_email_key("exp@example.com", at(61)) is None
    assert await store.transact(lambda uow: uow.codes.claim_use(code.id, at(60))) is False
    assert await store.transact(lambda uow: uow.codes.claim_use(code.id, at(60) - MICROSECOND)) is True


async def test_live_rule_at_the_use_limit(store: Store) -> None:
    owner = await add_user(store, "uses@example.com")
    code = await add_code(store, owner, "Uses2", max_uses=2)
    assert await store.transact(lambda uow: uow.codes.claim_use(code.id, T0)) is True
    live = await read(store, lambda uow: uow.codes.live_by_email_key("uses@example.com", T0))
    assert live is not None
    assert live.use_count == 1
    assert await store.transact(lambda uow: uow.codes.claim_use(code.id, T0)) is True
    # use_count == max_uses: used up.
    assert await read(store, lambda uow: uow.codes.live_by_email_key("uses@example.com", T0)) is None
    assert await store.transact(lambda uow: uow.codes.claim_use(code.id, T0)) is False
    stored = await read(store, lambda uow: uow.codes.get(code.id))
    assert stored is not None
    assert stored.use_count == 2


async def test_zero_max_uses_is_unlimited(store: Store) -> None:
    owner = await add_user(store, "unlimited@example.com")
    code = await add_code(store, owner, "Free1", max_uses=0)
    for _ in range(5):
        assert await store.transact(lambda uow: uow.codes.claim_use(code.id, T0)) is True
    live = await read(store, lambda uow: uow.codes.live_by_email_key("unlimited@example.com", T0))
    assert live is not None
    assert live.use_count == 5


async def test_claim_use_of_a_revoked_or_unknown_code_fails(store: Store) -> None:
    owner = await add_user(store, "rev@example.com")
    code = await add_code(store, owner, "Rev1")
    await store.transact(lambda uow: uow.codes.revoke_open(owner.id, at(1)))
    assert await store.transact(lambda uow: uow.codes.claim_use(code.id, at(2))) is False
    assert await store.transact(lambda uow: uow.codes.claim_use(code.id + 1000, at(2))) is False
    assert await read(store, lambda uow: uow.codes.live_by_email_key("rev@example.com", at(2))) is None


async def test_live_by_email_key_of_an_unknown_or_codeless_account(store: Store) -> None:
    await add_user(store, "codeless@example.com")
    async with store.read() as uow:
        assert await uow.codes.live_by_email_key("codeless@example.com", T0) is None
        assert await uow.codes.live_by_email_key("nobody@example.com", T0) is None


async def test_concurrent_claims_never_exceed_max_uses(store: Store) -> None:
    owner = await add_user(store, "popular@example.com")
    code = await add_code(store, owner, "Popular", max_uses=3)

    async def claim(uow: UnitOfWork) -> bool:
        claimed = await uow.codes.claim_use(code.id, T0)
        await asyncio.sleep(0)  # let the others run while this transaction is open
        return claimed

    results = await asyncio.gather(*(store.transact(claim) for _ in range(N)))
    assert results.count(True) == 3
    stored = await read(store, lambda uow: uow.codes.get(code.id))
    assert stored is not None
    assert stored.use_count == 3


async def test_close_dead_closes_an_expired_code(store: Store) -> None:
    owner = await add_user(store, "dead@example.com")
    code = await add_code(store, owner, "Dead1", expire_time=at(60))
    await store.transact(lambda uow: uow.codes.close_dead(owner.id, at(60) - MICROSECOND))
    assert await read(store, lambda uow: uow.codes.open_code(owner.id)) == code
    await store.transact(lambda uow: uow.codes.close_dead(owner.id, at(60)))
    async with store.read() as uow:
        assert await uow.codes.open_code(owner.id) is None
        assert await uow.codes.get(code.id) == code  # closed, not revoked
    fresh = await add_code(store, owner, "Fresh1", now=at(61), expire_time=at(600))
    assert await read(store, lambda uow: uow.codes.open_code(owner.id)) == fresh
    assert await read(store, lambda uow: uow.codes.live_by_email_key("dead@example.com", at(61))) == fresh


async def test_close_dead_closes_a_used_up_code(store: Store) -> None:
    owner = await add_user(store, "usedup@example.com")
    code = await add_code(store, owner, "Usedup1", max_uses=1)
    await store.transact(lambda uow: uow.codes.close_dead(owner.id, T0))
    assert await read(store, lambda uow: uow.codes.open_code(owner.id)) == code
    assert await store.transact(lambda uow: uow.codes.claim_use(code.id, T0)) is True
    await store.transact(lambda uow: uow.codes.close_dead(owner.id, T0))
    assert await read(store, lambda uow: uow.codes.open_code(owner.id)) is None
    await add_code(store, owner, "Usedup2")


async def test_close_dead_without_an_open_code_does_nothing(store: Store) -> None:
    owner = await add_user(store, "nocode@example.com")
    await store.transact(lambda uow: uow.codes.close_dead(owner.id, T0))
    assert await read(store, lambda uow: uow.codes.open_code(owner.id)) is None


async def test_revoke_open(store: Store) -> None:
    owner = await add_user(store, "revoker@example.com")
    code = await add_code(store, owner, "Revoke1")
    revoked = await store.transact(lambda uow: uow.codes.revoke_open(owner.id, at(5)))
    assert revoked is not None
    assert revoked.id == code.id
    assert revoked.revoke_time == at(5)
    async with store.read() as uow:
        assert await uow.codes.open_code(owner.id) is None
        assert await uow.codes.get(code.id) == revoked
        assert await uow.codes.by_key("revoke1") == revoked
    assert await store.transact(lambda uow: uow.codes.revoke_open(owner.id, at(6))) is None
    # The slot is free again.
    await add_code(store, owner, "Revoke2", now=at(7))


async def reissue(store: Store, owner: User, code: str, now: datetime = T0, **fields: Any) -> ReferralCode:
    """What CreateReferralCode does for a vanity code: reclaim the owner's closed code with this
    key, then add the new code, in one transaction."""
    new = NewCode(
        code=code,
        code_key=code.lower(),
        owner_id=owner.id,
        expire_time=fields.pop("expire_time", at(3600)),
        max_uses=fields.pop("max_uses", 0),
    )

    async def work(uow: UnitOfWork) -> ReferralCode:
        await uow.codes.reclaim(owner.id, new.code_key)
        return await uow.codes.add(new, now)

    return await store.transact(work)


async def test_an_owner_reclaims_their_closed_code_and_the_old_one_stays_as_history(store: Store) -> None:
    owner = await add_user(store, "reclaimer@example.com")
    old = await add_code(store, owner, "Mine1", max_uses=3)
    assert await store.transact(lambda uow: uow.codes.claim_use(old.id, T0)) is True
    # Open: not reclaimable (the open code keeps its key).
    assert await store.transact(lambda uow: uow.codes.reclaim(owner.id, "mine1")) is False
    await store.transact(lambda uow: uow.codes.revoke_open(owner.id, at(1)))
    fresh = await reissue(store, owner, "Mine1", now=at(2), max_uses=5)
    assert (fresh.code, fresh.use_count, fresh.max_uses, fresh.create_time) == ("Mine1", 0, 5, at(2))
    async with store.read() as uow:
        assert await uow.codes.by_key("mine1") == fresh
        assert await uow.codes.open_code(owner.id) == fresh
        history = await uow.codes.get(old.id)
    assert history is not None
    assert (history.code, history.use_count, history.revoke_time) == ("Mine1", 1, at(1))
    # Expired and closed, it can be reissued again.
    await store.transact(lambda uow: uow.codes.close_dead(owner.id, at(3601)))
    third = await reissue(store, owner, "MINE1", now=at(3601), expire_time=at(7200))
    assert await read(store, lambda uow: uow.codes.by_key("mine1")) == third


async def test_nobody_else_can_reclaim_a_closed_code(store: Store) -> None:
    owner = await add_user(store, "keeper@example.com")
    other = await add_user(store, "squatter@example.com")
    code = await add_code(store, owner, "Keep1")
    await store.transact(lambda uow: uow.codes.revoke_open(owner.id, at(1)))
    assert await store.transact(lambda uow: uow.codes.reclaim(other.id, "keep1")) is False
    assert await conflict_of(reissue(store, other, "KEEP1", now=at(2))) == CODE_TAKEN
    assert await store.transact(lambda uow: uow.codes.reclaim(other.id, "nothing")) is False
    revoked = await read(store, lambda uow: uow.codes.by_key("keep1"))
    assert revoked is not None
    assert (revoked.id, revoked.owner_id, revoked.revoke_time) == (code.id, owner.id, at(1))


async def test_a_reclaim_rolled_back_keeps_the_key_on_the_old_code(store: Store) -> None:
    owner = await add_user(store, "busy@example.com")
    old = await add_code(store, owner, "Busy1")
    await store.transact(lambda uow: uow.codes.revoke_open(owner.id, at(1)))
    await add_code(store, owner, "Other1", now=at(2))  # a live code holds the open slot
    assert await conflict_of(reissue(store, owner, "Busy1", now=at(3))) == OPEN_CODE_EXISTS
    held = await read(store, lambda uow: uow.codes.by_key("busy1"))
    assert held is not None
    assert held.id == old.id


async def test_concurrent_reclaims_and_squatters_leave_the_code_with_its_owner(store: Store) -> None:
    owner = await add_user(store, "brand@example.com")
    squatters = [await add_user(store, f"squatter{i}@example.com") for i in range(N // 2)]
    await add_code(store, owner, "Brand1")
    await store.transact(lambda uow: uow.codes.revoke_open(owner.id, at(1)))
    results = await asyncio.gather(
        *(reissue(store, owner, "Brand1", now=at(2)) for _ in range(N // 2)),
        *(reissue(store, squatter, "BRAND1", now=at(2)) for squatter in squatters),
        return_exceptions=True,
    )
    made = outcomes(list(results))
    codes = [result for result in made if isinstance(result, ReferralCode)]
    assert len(codes) == 1
    assert codes[0].owner_id == owner.id
    assert set(made[N // 2 :]) == {CODE_TAKEN}  # every squatter
    assert await read(store, lambda uow: uow.codes.by_key("brand1")) == codes[0]


# --- referrals ------------------------------------------------------------------------------------


async def test_referral_pages_by_user_id_with_codes(store: Store) -> None:
    referrer = await add_user(store, "referrer@example.com")
    other = await add_user(store, "other@example.com")
    code = await add_code(store, referrer, "RefCode")
    mine: list[User] = []
    for i in range(5):
        # Interleave another referrer's referrals: pages must skip them.
        await add_user(store, f"theirs{i}@example.com", referrer_id=other.id)
        fields: dict[str, Any] = {"referrer_id": referrer.id}
        if i % 2 == 0:
            fields["referral_code_id"] = code.id
        mine.append(await add_user(store, f"Mine{i}@example.com", now=at(i), **fields))
    async with store.read() as uow:
        first = await uow.referrals.page(referrer.id, 0, 2)
        second = await uow.referrals.page(referrer.id, first[-1].user_id, 2)
        third = await uow.referrals.page(referrer.id, second[-1].user_id, 2)
        rest = await uow.referrals.page(referrer.id, third[-1].user_id, 2)
        everything = await uow.referrals.page(referrer.id, 0, 100)
        none_left = await uow.referrals.page(referrer.id, mine[-1].id, 100)
        from_middle = await uow.referrals.page(referrer.id, mine[1].id, 100)
        of_nobody = await uow.referrals.page(referrer.id + 1000, 0, 100)
    assert [len(first), len(second), len(third), len(rest)] == [2, 2, 1, 0]
    assert first + second + third == everything
    assert [r.user_id for r in everything] == [u.id for u in mine]
    assert [r.email for r in everything] == [f"Mine{i}@example.com" for i in range(5)]
    assert [r.join_time for r in everything] == [at(i) for i in range(5)]
    assert [r.code for r in everything] == ["RefCode", "", "RefCode", "", "RefCode"]
    assert none_left == []
    assert [r.user_id for r in from_middle] == [u.id for u in mine[2:]]
    assert of_nobody == []


async def test_referral_counts(store: Store) -> None:
    referrer = await add_user(store, "counted@example.com")
    assert await read(store, lambda uow: uow.referrals.count(referrer.id)) == 0
    for _ in range(3):
        await store.transact(lambda uow: uow.users.count_referral(referrer.id))
    async with store.read() as uow:
        assert await uow.referrals.count(referrer.id) == 3
        assert await uow.referrals.count(referrer.id + 1000) is None


async def test_concurrent_referral_counts_are_not_lost(store: Store) -> None:
    referrer = await add_user(store, "busy@example.com")

    async def count(uow: UnitOfWork) -> None:
        await asyncio.sleep(0)
        await uow.users.count_referral(referrer.id)

    await asyncio.gather(*(store.transact(count) for _ in range(N)))
    assert await read(store, lambda uow: uow.referrals.count(referrer.id)) == N


# --- sessions and revocations ---------------------------------------------------------------------


async def test_session_record(store: Store) -> None:
    user = await add_user(store, "session@example.com")
    await add_session(store, user, "s1", "j1", expire_time=at(100))
    record = await read(store, lambda uow: uow.sessions.get("s1"))
    assert record == ports.SessionRecord(
        id="s1",
        user_id=user.id,
        refresh_jti="j1",
        create_time=T0,
        refresh_time=None,
        expire_time=at(100),
        revoke_time=None,
        revoke_reason=None,
    )
    assert await read(store, lambda uow: uow.sessions.get("missing")) is None


async def test_a_refresh_token_rotates_once(store: Store) -> None:
    user = await add_user(store, "once@example.com")
    other = await add_user(store, "other@example.com")
    await add_session(store, user, "s1", "j1", expire_time=at(100))
    assert await rotate(store, other, "s1", "j1", "j2", at(1)) is False
    assert await rotate(store, user, "s1", "nope", "j2", at(1)) is False
    assert await rotate(store, user, "s1", "j1", "j2", at(1), expire_time=at(200)) is True
    assert await rotate(store, user, "s1", "j1", "j3", at(2)) is False  # used: no longer current
    assert await rotate(store, user, "missing", "j1", "j3", at(2)) is False
    record = await read(store, lambda uow: uow.sessions.get("s1"))
    assert record is not None
    assert (record.refresh_jti, record.refresh_time, record.expire_time) == ("j2", at(1), at(200))


async def test_an_expired_session_cannot_rotate(store: Store) -> None:
    user = await add_user(store, "late@example.com")
    await add_session(store, user, "s1", "j1", expire_time=at(100))
    await add_session(store, user, "s2", "j2", expire_time=at(100))
    assert await rotate(store, user, "s1", "j1", "x1", at(100)) is False
    assert await rotate(store, user, "s2", "j2", "x2", at(100) - MICROSECOND) is True


async def test_concurrent_rotations_of_a_token_succeed_once(store: Store) -> None:
    user = await add_user(store, "thief@example.com")
    await add_session(store, user, "s1", "j1")

    async def use(new_jti: str) -> bool:
        async def work(uow: UnitOfWork) -> bool:
            rotated = await uow.sessions.rotate(
                session_id="s1",
                user_id=user.id,
                refresh_jti="j1",
                new_jti=new_jti,
                now=at(1),
                expire_time=at(3600),
            )
            await asyncio.sleep(0)
            return rotated

        return await store.transact(work)

    results = await asyncio.gather(*(use(f"n{i}") for i in range(N)))
    assert results.count(True) == 1


async def test_a_revoked_session_never_rotates_again(store: Store) -> None:
    """Rotations racing a revocation: once the revocation has committed, no rotation succeeds."""
    user = await add_user(store, "race@example.com")
    await add_session(store, user, "s1", "j0")
    current = "j0"

    async def chain() -> None:
        nonlocal current
        for i in range(1, N):
            if not await rotate(store, user, "s1", current, f"j{i}", at(i)):
                return
            current = f"j{i}"
            await asyncio.sleep(0)

    async def revoke() -> None:
        await asyncio.sleep(0)
        await store.transact(lambda uow: uow.sessions.revoke(["s1"], at(2), ports.REVOKED_BY_LOGOUT))

    await asyncio.gather(chain(), revoke())
    assert await rotate(store, user, "s1", current, "after", at(N)) is False
    record = await read(store, lambda uow: uow.sessions.get("s1"))
    assert record is not None
    assert record.revoke_reason == ports.REVOKED_BY_LOGOUT
    assert record.refresh_jti == current


async def test_revoke_keeps_the_first_revocation_and_touches_only_its_sessions(store: Store) -> None:
    user = await add_user(store, "family@example.com")
    for sid in ("sa", "sb", "sc"):
        await add_session(store, user, sid, f"{sid}-1")
    await store.transact(lambda uow: uow.sessions.revoke(["sa", "sb"], at(5), ports.REVOKED_BY_LOGOUT))
    await store.transact(lambda uow: uow.sessions.revoke(["sa", "unknown"], at(6), ports.REVOKED_BY_REUSE))
    await store.transact(lambda uow: uow.sessions.revoke([], at(6), ports.REVOKED_BY_REUSE))
    async with store.read() as uow:
        records = {sid: await uow.sessions.get(sid) for sid in ("sa", "sb", "sc")}
    assert {sid: (r.revoke_time, r.revoke_reason) for sid, r in records.items() if r is not None} == {
        "sa": (at(5), "logout"),
        "sb": (at(5), "logout"),
        "sc": (None, None),
    }
    assert await rotate(store, user, "sa", "sa-1", "x", at(7)) is False
    assert await rotate(store, user, "sc", "sc-1", "x", at(7)) is True


async def test_live_sessions_of_a_user(store: Store) -> None:
    user = await add_user(store, "many@example.com")
    other = await add_user(store, "else@example.com")
    await add_session(store, user, "late", "j", now=at(3))
    await add_session(store, user, "early", "j", now=at(1))
    await add_session(store, user, "expired", "j", now=at(0), expire_time=at(5))
    await add_session(store, user, "revoked", "j", now=at(2))
    await add_session(store, other, "others", "j", now=at(1))
    await store.transact(lambda uow: uow.sessions.revoke(["revoked"], at(4), ports.REVOKED_BY_LOGOUT))
    live = await read(store, lambda uow: uow.sessions.live(user.id, at(5)))
    assert [record.id for record in live] == ["early", "late"]
    assert [r.id for r in await read(store, lambda uow: uow.sessions.live(other.id, at(5)))] == ["others"]


async def test_revocations_keep_the_latest_expiry(store: Store) -> None:
    await store.transact(lambda uow: uow.sessions.add_revocations([("jti:x", at(10)), ("sid:y", at(30))]))
    await store.transact(lambda uow: uow.sessions.add_revocations([("jti:x", at(5))]))  # earlier: ignored
    await store.transact(lambda uow: uow.sessions.add_revocations([("sid:y", at(40))]))  # later: wins
    await store.transact(lambda uow: uow.sessions.add_revocations([]))
    async with store.read() as uow:
        assert sorted(await uow.sessions.live_revocations(T0)) == [("jti:x", at(10)), ("sid:y", at(40))]
        assert sorted(await uow.sessions.live_revocations(at(10))) == [("sid:y", at(40))]
        assert await uow.sessions.live_revocations(at(40)) == []
        assert await uow.sessions.any_revoked(["jti:other", "jti:x"], at(10) - MICROSECOND) is True
        assert await uow.sessions.any_revoked(["jti:x"], at(10)) is False  # expire_time == now
        assert await uow.sessions.any_revoked(["sid:y"], at(39)) is True
        assert await uow.sessions.any_revoked(["jti:other"], T0) is False
        assert await uow.sessions.any_revoked([], T0) is False


async def test_one_call_may_name_a_key_twice(store: Store) -> None:
    await store.transact(lambda uow: uow.sessions.add_revocations([("jti:z", at(10)), ("jti:z", at(20))]))
    assert await read(store, lambda uow: uow.sessions.live_revocations(T0)) == [("jti:z", at(20))]


# --- request ids ----------------------------------------------------------------------------------


def remember(
    uow: UnitOfWork,
    request_id: str,
    *,
    resource_id: int,
    now: datetime,
    expire_time: datetime,
    scope: str = "register",
) -> Awaitable[None]:
    return uow.requests.remember(
        scope=scope,
        request_id=request_id,
        fingerprint=f"fp-{resource_id}",
        resource_id=resource_id,
        now=now,
        expire_time=expire_time,
    )


async def test_a_request_id_is_remembered_until_it_expires(store: Store) -> None:
    await store.transact(lambda uow: remember(uow, "r1", resource_id=7, now=T0, expire_time=at(10)))
    async with store.read() as uow:
        assert await uow.requests.get("register", "r1", at(10) - MICROSECOND) == ports.RememberedRequest(
            "fp-7", 7
        )
        assert await uow.requests.get("register", "r1", at(10)) is None
        assert await uow.requests.get("create_code", "r1", T0) is None
        assert await uow.requests.get("register", "r2", T0) is None


async def test_a_live_request_id_conflicts(store: Store) -> None:
    await store.transact(lambda uow: remember(uow, "r1", resource_id=7, now=T0, expire_time=at(10)))
    work = store.transact(
        lambda uow: remember(uow, "r1", resource_id=8, now=at(10) - MICROSECOND, expire_time=at(20))
    )
    assert await conflict_of(work) == REQUEST_ID_TAKEN
    # Another scope is another id.
    await store.transact(
        lambda uow: remember(uow, "r1", scope="create_code", resource_id=9, now=T0, expire_time=at(10))
    )
    async with store.read() as uow:
        assert await uow.requests.get("register", "r1", T0) == ports.RememberedRequest("fp-7", 7)
        assert await uow.requests.get("create_code", "r1", T0) == ports.RememberedRequest("fp-9", 9)


async def test_an_expired_request_id_is_replaced(store: Store) -> None:
    await store.transact(lambda uow: remember(uow, "r1", resource_id=7, now=T0, expire_time=at(10)))
    await store.transact(lambda uow: remember(uow, "r1", resource_id=8, now=at(10), expire_time=at(20)))
    async with store.read() as uow:
        assert await uow.requests.get("register", "r1", at(10)) == ports.RememberedRequest("fp-8", 8)
        assert await uow.requests.get("register", "r1", at(20)) is None


async def test_concurrent_uses_of_a_request_id_remember_one(store: Store) -> None:
    async def work(uow: UnitOfWork, resource_id: int) -> int:
        await remember(uow, "same", resource_id=resource_id, now=T0, expire_time=at(10))
        return resource_id

    results = await asyncio.gather(
        *(store.transact(lambda uow, i=i: work(uow, i)) for i in range(N)), return_exceptions=True
    )
    made = outcomes(list(results))
    winners = [result for result in made if isinstance(result, int)]
    assert len(winners) == 1
    assert made.count(REQUEST_ID_TAKEN) == N - 1
    remembered = await read(store, lambda uow: uow.requests.get("register", "same", T0))
    assert remembered == ports.RememberedRequest(f"fp-{winners[0]}", winners[0])


# --- profiles (enrichment jobs) -------------------------------------------------------------------


async def test_profile_jobs_lifecycle(store: Store) -> None:
    users = [await add_user(store, f"p{i}@example.com") for i in range(3)]
    u1, u2, u3 = (user.id for user in users)
    for user_id, seconds in ((u1, 0), (u2, 1), (u3, 2)):
        job = await store.transact(lambda uow, u=user_id, s=seconds: uow.profiles.add_job(u, at(s)))
        assert job == Profile(state=ProfileState.PENDING)
    async with store.read() as uow:
        stored = await uow.users.get(u1)
        assert stored is not None
        assert stored.profile == Profile(state=ProfileState.PENDING)
        assert await uow.users.by_email_key("p0@example.com") == stored
        assert await uow.profiles.due(at(1), 10) == [u1, u2]
        assert await uow.profiles.due(at(5), 2) == [u1, u2]
        assert await uow.profiles.due(at(-1), 10) == []
        assert await uow.profiles.next_due_time() == T0
        assert await uow.profiles.next_due_time([u1]) == at(1)
        assert await uow.profiles.next_due_time([u1, u2, u3]) is None

    # Claim: the lease moves the job out of "due" and counts the attempt.
    claim = await store.transact(lambda uow: uow.profiles.claim(u1, at(1), at(100)))
    assert claim == ProfileClaim(email="p0@example.com", attempts=1)
    assert await store.transact(lambda uow: uow.profiles.claim(u1, at(1), at(100))) is None
    async with store.read() as uow:
        assert await uow.profiles.due(at(50), 10) == [u2, u3]
        assert await uow.profiles.next_due_time([u2, u3]) == at(100)
    # A job not yet due cannot be claimed; an expired lease can be taken again.
    assert await store.transact(lambda uow: uow.profiles.claim(u3, at(1), at(100))) is None
    claim = await store.transact(lambda uow: uow.profiles.claim(u1, at(100), at(200)))
    assert claim == ProfileClaim(email="p0@example.com", attempts=2)

    # Release: due now, the interrupted attempt not counted.
    await store.transact(lambda uow: uow.profiles.release([u1], at(101)))
    assert await read(store, lambda uow: uow.profiles.due(at(101), 10)) == [u2, u3, u1]
    claim = await store.transact(lambda uow: uow.profiles.claim(u1, at(101), at(200)))
    assert claim == ProfileClaim(email="p0@example.com", attempts=2)

    # Reschedule: due later.
    await store.transact(lambda uow: uow.profiles.reschedule(u1, at(102), at(500), error="timeout"))
    async with store.read() as uow:
        assert await uow.profiles.due(at(499), 10) == [u2, u3]
        assert await uow.profiles.due(at(500), 10) == [u2, u3, u1]

    # Finish with a person: the profile carries it; the job is gone for good.
    person = PersonData(
        full_name="Ada Lovelace",
        company="Analytical Engines",
        title="Programmer",
        location="London",
        avatar_uri="https://example.com/ada.png",
    )
    await store.transact(
        lambda uow: uow.profiles.finish(u1, ProfileState.FOUND, at(600), source="clearbit", person=person)
    )
    found = Profile(
        state=ProfileState.FOUND,
        full_name="Ada Lovelace",
        company="Analytical Engines",
        title="Programmer",
        location="London",
        avatar_uri="https://example.com/ada.png",
        source="clearbit",
        fetch_time=at(600),
    )
    async with store.read() as uow:
        stored = await uow.users.get(u1)
        assert stored is not None
        assert stored.profile == found
        assert await uow.users.by_email_key("p0@example.com") == stored
        assert await uow.profiles.due(at(10_000), 10) == [u2, u3]
        assert await uow.profiles.next_due_time([u2, u3]) is None
    promoted = await store.transact(lambda uow: uow.users.make_superuser(u1, at(601)))
    assert promoted is not None
    assert promoted.profile == found
    # A finished job ignores every later step.
    assert await store.transact(lambda uow: uow.profiles.claim(u1, at(10_000), at(20_000))) is None

    async def late_steps(uow: UnitOfWork) -> None:
        await uow.profiles.finish(u1, ProfileState.FAILED, at(700), source="other", error="late")
        await uow.profiles.reschedule(u1, at(700), at(800), error="late")
        await uow.profiles.release([u1], at(700))

    await store.transact(late_steps)
    stored = await read(store, lambda uow: uow.users.get(u1))
    assert stored is not None
    assert stored.profile == found
    assert await read(store, lambda uow: uow.profiles.due(at(10_000), 10)) == [u2, u3]

    # Finish without a person: no personal fields.
    await store.transact(
        lambda uow: uow.profiles.finish(u2, ProfileState.NOT_FOUND, at(700), source="clearbit")
    )
    async with store.read() as uow:
        second = await uow.users.get(u2)
        third = await uow.users.get(u3)
    assert second is not None
    assert second.profile == Profile(state=ProfileState.NOT_FOUND, source="clearbit", fetch_time=at(700))
    assert third is not None
    assert third.profile == Profile(state=ProfileState.PENDING)


async def test_claim_and_release_of_unknown_jobs(store: Store) -> None:
    user = await add_user(store, "nojob@example.com")
    assert await store.transact(lambda uow: uow.profiles.claim(user.id, at(1), at(2))) is None
    await store.transact(lambda uow: uow.profiles.release([], at(1)))
    await store.transact(lambda uow: uow.profiles.release([user.id], at(1)))
    assert await read(store, lambda uow: uow.profiles.due(at(1), 10)) == []


async def test_release_never_counts_below_zero_attempts(store: Store) -> None:
    user = await add_user(store, "fresh@example.com")
    await store.transact(lambda uow: uow.profiles.add_job(user.id, T0))
    await store.transact(lambda uow: uow.profiles.release([user.id], at(1)))
    await store.transact(lambda uow: uow.profiles.release([user.id], at(1)))
    claim = await store.transact(lambda uow: uow.profiles.claim(user.id, at(1), at(2)))
    assert claim == ProfileClaim(email="fresh@example.com", attempts=1)


async def test_concurrent_claims_of_a_job_lease_it_once(store: Store) -> None:
    user = await add_user(store, "lease@example.com")
    await store.transact(lambda uow: uow.profiles.add_job(user.id, T0))

    async def claim(uow: UnitOfWork) -> ProfileClaim | None:
        claimed = await uow.profiles.claim(user.id, at(1), at(60))
        await asyncio.sleep(0)
        return claimed

    results = await asyncio.gather(*(store.transact(claim) for _ in range(N)))
    assert [result for result in results if result is not None] == [
        ProfileClaim(email="lease@example.com", attempts=1)
    ]


# --- purge ----------------------------------------------------------------------------------------


async def test_purge_expired(store: Store) -> None:
    user = await add_user(store, "purge@example.com")
    code = await add_code(store, user, "Kept1", expire_time=at(10))
    await add_session(store, user, "old", "j1", expire_time=at(10))
    await add_session(store, user, "new", "j2", expire_time=at(11))

    async def setup(uow: UnitOfWork) -> None:
        await uow.sessions.add_revocations([("jti:old", at(10)), ("jti:new", at(11))])
        await remember(uow, "old", resource_id=1, now=T0, expire_time=at(10))
        await remember(uow, "new", resource_id=2, now=T0, expire_time=at(11))
        await uow.profiles.add_job(user.id, T0)

    await store.transact(setup)
    assert await store.transact(lambda uow: uow.purge_expired(at(10))) == 3
    assert await store.transact(lambda uow: uow.purge_expired(at(10))) == 0
    async with store.read() as uow:
        assert await uow.sessions.get("old") is None
        assert await uow.sessions.get("new") is not None
        assert await uow.sessions.live_revocations(T0) == [("jti:new", at(11))]
        assert await uow.requests.get("register", "old", T0) is None
        assert await uow.requests.get("register", "new", T0) is not None
        # Users, codes and jobs are not purged.
        assert await uow.users.get(user.id) is not None
        assert await uow.codes.get(code.id) == code
        assert await uow.profiles.due(at(10), 10) == [user.id]
    # A revoked session is kept (its revoked state) until its refresh token would expire.
    await store.transact(lambda uow: uow.sessions.revoke(["new"], at(10), ports.REVOKED_BY_LOGOUT))
    assert await store.transact(lambda uow: uow.purge_expired(at(11) - MICROSECOND)) == 0
    assert await store.transact(lambda uow: uow.purge_expired(at(11))) == 3


# --- service accounts -----------------------------------------------------------------------------


async def test_service_accounts(store: Store) -> None:
    async def add(name: str, client_id: str) -> ports.ServiceAccount:
        return await store.transact(
            lambda uow: uow.service_accounts.add(
                name=name, client_id=client_id, secret_hash=f"h-{name}", scopes=["a:b", "c:d"], now=T0
            )
        )

    billing = await add("billing", "svc_1")
    assert (billing.name, billing.client_id, billing.secret_hash, billing.scopes) == (
        "billing",
        "svc_1",
        "h-billing",
        ("a:b", "c:d"),
    )
    assert (billing.create_time, billing.revoke_time) == (T0, None)
    await add("alpha", "svc_2")
    assert await conflict_of(add("billing", "svc_3")) == ports.SERVICE_ACCOUNT_TAKEN
    async with store.read() as uow:
        assert await uow.service_accounts.by_client_id("svc_1") == billing
        assert await uow.service_accounts.by_name("billing") == billing
        assert await uow.service_accounts.by_client_id("svc_9") is None
        assert [account.name for account in await uow.service_accounts.all()] == ["alpha", "billing"]
    await store.transact(lambda uow: uow.service_accounts.revoke(billing.id, at(5)))
    await store.transact(lambda uow: uow.service_accounts.revoke(billing.id, at(6)))  # the first stays
    revoked = await read(store, lambda uow: uow.service_accounts.by_name("billing"))
    assert revoked is not None
    assert revoked.revoke_time == at(5)
    # A revoked account keeps its name.
    assert await conflict_of(add("billing", "svc_4")) == ports.SERVICE_ACCOUNT_TAKEN


# --- email tokens and the mail queue ----------------------------------------------------------------


async def add_token(
    store: Store,
    user: User,
    token_hash: str,
    *,
    purpose: str = ports.VERIFY_EMAIL,
    code_hash: str | None = "c0de",
    expire_time: datetime | None = None,
) -> ports.EmailToken:
    expire_time = expire_time or at(60)
    await store.transact(
        lambda uow: uow.email_tokens.add(
            user_id=user.id,
            purpose=purpose,
            token_hash=token_hash,
            code_hash=code_hash,
            now=T0,
            expire_time=expire_time,
        )
    )
    async with store.read() as uow:
        found = await uow.email_tokens.by_hash(token_hash)
    assert found is not None
    return found


async def test_an_email_token_is_used_once_and_not_after_it_expires(store: Store) -> None:
    user = await add_user(store, "tokens@example.com")
    first = await add_token(store, user, "h1")
    assert (first.user_id, first.purpose, first.code_failures, first.use_time) == (
        user.id, ports.VERIFY_EMAIL, 0, None,
    )  # fmt: skip
    assert await store.transact(lambda uow: uow.email_tokens.use(first.id, at(1)))
    assert not await store.transact(lambda uow: uow.email_tokens.use(first.id, at(2)))
    async with store.read() as uow:
        used = await uow.email_tokens.by_hash("h1")
    assert used is not None
    assert used.use_time == at(1)
    late = await add_token(store, user, "h2", expire_time=at(10))
    assert not await store.transact(lambda uow: uow.email_tokens.use(late.id, at(10)))  # expired at 10
    assert await store.transact(lambda uow: uow.email_tokens.use(late.id, at(10) - MICROSECOND))


async def test_concurrent_uses_of_an_email_token_use_it_once(store: Store) -> None:
    user = await add_user(store, "race-token@example.com")
    token = await add_token(store, user, "race")

    async def use(uow: UnitOfWork) -> bool:
        used = await uow.email_tokens.use(token.id, at(1))
        await asyncio.sleep(0)
        return used

    assert sorted(await asyncio.gather(*(store.transact(use) for _ in range(N)))) == [False] * (N - 1) + [
        True
    ]


async def test_tokens_with_codes_use_all_and_failures(store: Store) -> None:
    user = await add_user(store, "codes@example.com")
    other = await add_user(store, "other-codes@example.com")
    a = await add_token(store, user, "a")
    b = await add_token(store, user, "b")
    await add_token(store, user, "nocode", code_hash=None)
    await add_token(store, user, "reset", purpose=ports.PASSWORD_RESET)
    await add_token(store, user, "old", expire_time=at(1))
    await add_token(store, other, "theirs")
    async with store.read() as uow:
        live = await uow.email_tokens.with_codes(user.id, ports.VERIFY_EMAIL, at(1))
    assert sorted(t.id for t in live) == sorted([a.id, b.id])
    await store.transact(lambda uow: uow.email_tokens.count_code_failure([a.id, a.id, b.id]))
    async with store.read() as uow:
        failures = {
            t.id: t.code_failures for t in await uow.email_tokens.with_codes(user.id, ports.VERIFY_EMAIL, T0)
        }
    assert failures[b.id] == 1
    assert failures[a.id] >= 1
    await store.transact(lambda uow: uow.email_tokens.use_all(user.id, ports.VERIFY_EMAIL, at(2)))
    async with store.read() as uow:
        assert await uow.email_tokens.with_codes(user.id, ports.VERIFY_EMAIL, T0) == []
        reset = await uow.email_tokens.by_hash("reset")
        theirs = await uow.email_tokens.by_hash("theirs")
    assert reset is not None
    assert reset.use_time is None  # another purpose
    assert theirs is not None
    assert theirs.use_time is None  # another user
    await store.transact(lambda uow: uow.email_tokens.discard("reset"))
    async with store.read() as uow:
        assert await uow.email_tokens.by_hash("reset") is None


async def test_mail_queue_lifecycle(store: Store) -> None:
    user = await add_user(store, "mail@example.com")

    async def enqueue(uow: UnitOfWork) -> None:
        await uow.mails.enqueue(
            ports.VERIFY_EMAIL, user_id=user.id, email_key=user.email_key, message_id="m1", now=T0
        )
        await uow.mails.enqueue(
            ports.PASSWORD_RESET, email_key="nobody@example.com", message_id="m2", now=at(1)
        )

    await store.transact(enqueue)
    async with store.read() as uow:
        first, second = await uow.mails.due(at(1), 10)
        assert await uow.mails.due(T0, 10) == [first]
        assert await uow.mails.next_due_time() == T0
        assert await uow.mails.next_due_time(exclude=[first]) == at(1)
    claim = await store.transact(lambda uow: uow.mails.claim(first, at(2), at(60)))
    assert claim == ports.MailClaim(
        id=first,
        kind=ports.VERIFY_EMAIL,
        user_id=user.id,
        email_key=user.email_key,
        message_id="m1",
        attempts=1,
    )
    assert await store.transact(lambda uow: uow.mails.claim(first, at(3), at(60))) is None  # leased
    await store.transact(lambda uow: uow.mails.reschedule(first, at(4), at(30), error="421 try later"))
    assert await store.transact(lambda uow: uow.mails.claim(first, at(29), at(90))) is None
    again = await store.transact(lambda uow: uow.mails.claim(first, at(30), at(90)))
    assert again is not None
    assert again.attempts == 2
    await store.transact(lambda uow: uow.mails.release([first], at(31)))  # the attempt does not count
    again = await store.transact(lambda uow: uow.mails.claim(first, at(31), at(90)))
    assert again is not None
    assert again.attempts == 2
    await store.transact(lambda uow: uow.mails.finish(first, "sent", at(32)))
    nobody = await store.transact(lambda uow: uow.mails.claim(second, at(32), at(90)))
    assert nobody is not None
    assert nobody.user_id is None
    assert nobody.email_key == "nobody@example.com"
    await store.transact(lambda uow: uow.mails.finish(second, "skipped", at(33)))
    async with store.read() as uow:
        assert await uow.mails.due(at(100), 10) == []
        assert await uow.mails.next_due_time() is None
    # Finished messages are purged after the retention period; pending ones never.
    await store.transact(
        lambda uow: uow.mails.enqueue(
            ports.PASSWORD_CHANGED, user_id=user.id, email_key="x", message_id="m3", now=T0
        )
    )
    assert (
        await store.transact(lambda uow: uow.purge_expired(at(32) + ports.MAIL_RETENTION - MICROSECOND)) == 0
    )
    assert await store.transact(lambda uow: uow.purge_expired(at(33) + ports.MAIL_RETENTION)) == 2
    async with store.read() as uow:
        assert len(await uow.mails.due(at(100), 10)) == 1


async def test_concurrent_claims_of_a_message_lease_it_once(store: Store) -> None:
    await store.transact(
        lambda uow: uow.mails.enqueue(ports.PASSWORD_RESET, email_key="x@example.com", message_id="m", now=T0)
    )
    async with store.read() as uow:
        (mail_id,) = await uow.mails.due(T0, 10)

    async def claim(uow: UnitOfWork) -> ports.MailClaim | None:
        claimed = await uow.mails.claim(mail_id, at(1), at(60))
        await asyncio.sleep(0)
        return claimed

    results = await asyncio.gather(*(store.transact(claim) for _ in range(N)))
    assert len([result for result in results if result is not None]) == 1


async def test_marking_a_user_verified_happens_once(store: Store) -> None:
    user = await add_user(store, "verify-once@example.com")
    assert (user.is_verified, user.verify_time) == (False, None)
    assert await store.transact(lambda uow: uow.users.mark_verified(user.id, at(5)))
    assert not await store.transact(lambda uow: uow.users.mark_verified(user.id, at(6)))
    async with store.read() as uow:
        stored = await uow.users.get(user.id)
    assert stored is not None
    assert (stored.is_verified, stored.verify_time) == (True, at(5))


# --- events (the outbox) ---------------------------------------------------------------------------


def _draft(n: int, kind: str = "user.registered") -> EventDraft:
    return EventDraft(kind, {"user_id": n, "email": f"u{n}@example.com"})


async def test_events_commit_with_their_transaction_and_read_back_in_cursor_order(store: Store) -> None:
    assert await read(store, lambda uow: uow.events.head()) == 0

    async def append(uow: UnitOfWork, n: int, kind: str = "user.registered") -> None:
        await uow.events.append(_draft(n, kind), at(n))

    for n in range(1, 4):
        await store.transact(lambda uow, n=n: append(uow, n))
    await store.transact(lambda uow: append(uow, 4, "referral_code.created"))

    async def failing(uow: UnitOfWork) -> None:
        await append(uow, 99)
        raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        await store.transact(failing)
    found = await read(store, lambda uow: uow.events.after(0, (), 10))
    assert [e.data["user_id"] for e in found] == [1, 2, 3, 4]
    cursors = [e.cursor for e in found]
    assert cursors == sorted(cursors)
    assert len(set(cursors)) == 4
    assert found[0].time == at(1)
    assert found[0].id.startswith("evt_")
    assert await read(store, lambda uow: uow.events.head()) == cursors[-1]
    assert [e.cursor for e in await read(store, lambda uow: uow.events.after(cursors[0], (), 2))] == cursors[
        1:3
    ]
    only = await read(store, lambda uow: uow.events.after(0, ("referral_code.created",), 10))
    assert [e.cursor for e in only] == [cursors[3]]
    upto = await read(store, lambda uow: uow.events.after(0, (), 10, upto=cursors[1]))
    assert [e.cursor for e in upto] == cursors[:2]


async def test_concurrent_appends_commit_in_cursor_order(store: Store) -> None:
    async def append(uow: UnitOfWork, n: int) -> None:
        await uow.events.append(_draft(n), T0)
        await asyncio.sleep(0)

    await asyncio.gather(*(store.transact(lambda uow, n=n: append(uow, n)) for n in range(N)))
    found = await read(store, lambda uow: uow.events.after(0, (), 100))
    assert sorted(e.data["user_id"] for e in found) == list(range(N))


async def test_purge_keeps_the_newest_event_and_records_how_far_it_went(store: Store) -> None:
    for n in range(1, 5):
        await store.transact(lambda uow, n=n: uow.events.append(_draft(n), at(n)))
    assert await read(store, lambda uow: uow.events.purged_through()) == 0
    assert await store.transact(lambda uow: uow.events.purge(at(3))) == 2  # at(1), at(2)
    remaining = await read(store, lambda uow: uow.events.after(0, (), 10))
    assert [e.data["user_id"] for e in remaining] == [3, 4]
    assert await read(store, lambda uow: uow.events.purged_through()) == remaining[0].cursor - 1
    assert await store.transact(lambda uow: uow.events.purge(at(100))) == 1  # never the newest
    assert [e.data["user_id"] for e in await read(store, lambda uow: uow.events.after(0, (), 10))] == [4]
