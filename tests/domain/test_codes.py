"""Referral codes: create (validation, one live code, dead codes replaced, vanity codes, request
ids), read, delete, and the cached look-up by email."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from referral_service.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
)
from referral_service.domain.models import CodeState, PublicCode, ReferralCode
from referral_service.domain.referrals import CODE_ALPHABET, GENERATED_CODE_LENGTH, CreateCodeCommand
from tests.domain.conftest import CACHE_TTL, MAX_HORIZON, NEGATIVE_CACHE_TTL, Domain, raises

# --- create --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "violations"),
    [
        ({}, {("expire_time", "REQUIRED")}),
        ({"ttl": timedelta(0)}, {("ttl", "NOT_POSITIVE")}),
        ({"ttl": MAX_HORIZON + timedelta(seconds=1)}, {("ttl", "TOO_FAR")}),
        # compared with the horizon before any addition: no overflow past the year 9999
        ({"ttl": timedelta(seconds=300_000_000_000)}, {("ttl", "TOO_FAR")}),
        ({"ttl": timedelta.max}, {("ttl", "TOO_FAR")}),
        ({"ttl": timedelta.min}, {("ttl", "NOT_POSITIVE")}),
        ({"expire_time": "now"}, {("expire_time", "IN_PAST")}),
        ({"expire_time": "max"}, {("expire_time", "TOO_FAR")}),
        ({"expire_time": "min"}, {("expire_time", "IN_PAST")}),
        ({"expire_time": "now", "ttl": timedelta(days=1)}, {("expire_time", "CONFLICT")}),
        ({"ttl": timedelta(days=1), "max_uses": -1}, {("max_uses", "NEGATIVE")}),
        ({"ttl": timedelta(days=1), "max_uses": 1_000_001}, {("max_uses", "TOO_LARGE")}),
        ({"ttl": timedelta(days=1), "code": "no spaces"}, {("code", "INVALID_CHARACTERS")}),
        ({"ttl": timedelta(days=1), "code": "abc"}, {("code", "INVALID_LENGTH")}),
        ({"ttl": timedelta(days=1), "request_id": "not-a-uuid"}, {("request_id", "INVALID_FORMAT")}),
        (
            {"code": "x", "max_uses": -5, "request_id": "?"},
            {
                ("code", "INVALID_LENGTH"),
                ("expire_time", "REQUIRED"),
                ("max_uses", "NEGATIVE"),
                ("request_id", "INVALID_FORMAT"),
            },
        ),
    ],
)
async def test_create_validation(
    domain: Domain, fields: dict[str, object], violations: set[tuple[str, str]]
) -> None:
    owner = await domain.register()
    if fields.get("expire_time") == "now":
        fields["expire_time"] = domain.clock()
    elif fields.get("expire_time") in ("max", "min"):
        fields["expire_time"] = (datetime.max if fields["expire_time"] == "max" else datetime.min).replace(
            tzinfo=UTC
        )
    error = await raises(InvalidArgument, domain.referrals.create_code(CreateCodeCommand(owner.id, **fields)))  # type: ignore[arg-type]
    assert error.reason is Reason.VALIDATION_FAILED
    assert {(v.field, v.reason) for v in error.violations} == violations
    async with domain.store.read() as uow:
        assert await uow.codes.open_code(owner.id) is None


async def test_a_generated_code(domain: Domain) -> None:
    owner = await domain.register()
    code = await domain.code(owner, ttl=timedelta(days=2), max_uses=10)
    assert len(code.code) == GENERATED_CODE_LENGTH
    assert set(code.code) <= set(CODE_ALPHABET)
    assert (code.owner_id, code.max_uses, code.use_count, code.revoke_time) == (owner.id, 10, 0, None)
    assert code.create_time == domain.clock()
    assert code.expire_time == domain.clock() + timedelta(days=2)
    assert await domain.referrals.my_code(owner.id) == code


async def test_a_vanity_code_with_an_expire_time(domain: Domain) -> None:
    owner = await domain.register()
    expire = domain.clock() + MAX_HORIZON
    code = await domain.code(owner, code="spring-24", expire_time=expire)
    assert code.code == "SPRING-24"
    assert code.expire_time == expire


async def test_one_live_code_at_a_time(domain: Domain) -> None:
    owner = await domain.register()
    first = await domain.code(owner)
    error = await raises(FailedPrecondition, domain.code(owner))
    assert error.reason is Reason.REFERRAL_CODE_ALREADY_ACTIVE
    assert await domain.referrals.my_code(owner.id) == first


async def test_concurrent_creations_leave_one_code(domain: Domain) -> None:
    owner = await domain.register()
    results = await asyncio.gather(*(domain.code(owner) for _ in range(5)), return_exceptions=True)
    made = [r for r in results if isinstance(r, ReferralCode)]
    assert len(made) == 1
    assert all(
        isinstance(r, FailedPrecondition) and r.reason is Reason.REFERRAL_CODE_ALREADY_ACTIVE
        for r in results
        if not isinstance(r, ReferralCode)
    )
    assert await domain.referrals.my_code(owner.id) == made[0]


async def test_an_expired_code_is_replaced(domain: Domain) -> None:
    owner = await domain.register()
    old = await domain.code(owner, ttl=timedelta(hours=1))
    domain.clock.advance(hours=1)
    assert (await domain.referrals.my_code(owner.id)).state(domain.clock()) is CodeState.EXPIRED
    new = await domain.code(owner)
    assert new.id != old.id
    assert await domain.referrals.my_code(owner.id) == new


async def test_a_used_up_code_is_replaced(domain: Domain) -> None:
    owner = await domain.register()
    await domain.code(owner, code="ONCE1", max_uses=1)
    await domain.register(referral_code="ONCE1")
    new = await domain.code(owner, code="TWICE2", max_uses=2)
    assert await domain.referrals.my_code(owner.id) == new


async def test_a_vanity_code_is_taken_forever(domain: Domain) -> None:
    first = await domain.register()
    second = await domain.register()
    await domain.code(first, code="Summer")
    taken = await raises(AlreadyExists, domain.code(second, code="SUMMER"))
    assert taken.reason is Reason.REFERRAL_CODE_TAKEN
    assert [v.field for v in taken.violations] == ["code"]
    # The owner's own live code: they have a live code (not "taken").
    live = await raises(FailedPrecondition, domain.code(first, code="summer"))
    assert live.reason is Reason.REFERRAL_CODE_ALREADY_ACTIVE
    await domain.referrals.delete_code(first.id)
    again = await raises(AlreadyExists, domain.code(second, code="summer"))
    assert again.reason is Reason.REFERRAL_CODE_TAKEN


async def test_an_owner_reissues_their_own_dead_vanity_code_afresh(domain: Domain) -> None:
    owner = await domain.register()
    old = await domain.code(owner, code="Autumn", max_uses=2)
    await domain.register(referral_code="AUTUMN")
    await domain.referrals.delete_code(owner.id)
    fresh = await domain.code(owner, code="autumn", max_uses=5, ttl=timedelta(seconds=10))
    assert (fresh.code, fresh.use_count, fresh.max_uses) == ("AUTUMN", 0, 5)
    assert fresh.id != old.id
    async with domain.store.read() as uow:
        assert await uow.codes.by_key("AUTUMN") == fresh
        history = await uow.codes.get(old.id)
    assert history is not None
    assert (history.code, history.use_count, history.revoke_time) == ("AUTUMN", 1, domain.clock())
    # Expired, it can be issued again too; the referral keeps pointing at the old code.
    domain.clock.advance(seconds=10)
    third = await domain.code(owner, code="AUTUMN")
    assert (third.use_count, third.max_uses) == (0, 0)
    page = await domain.referrals.list_referrals(owner.id, owner.id, 0, "")
    assert [r.code for r in page.referrals] == ["AUTUMN"]
    other = await domain.register()
    taken = await raises(AlreadyExists, domain.code(other, code="AUTUMN"))
    assert taken.reason is Reason.REFERRAL_CODE_TAKEN


async def test_a_retried_request_id_returns_the_first_code(domain: Domain) -> None:
    owner = await domain.register()
    request_id = str(uuid.uuid4())
    first = await domain.code(owner, ttl=timedelta(days=1), request_id=request_id)
    again = await domain.code(owner, ttl=timedelta(days=1), request_id=request_id)
    assert again == first
    conflict = await raises(InvalidArgument, domain.code(owner, ttl=timedelta(days=2), request_id=request_id))
    assert conflict.reason is Reason.REQUEST_ID_CONFLICT
    # Request ids are per owner: another owner's id is another request.
    other = await domain.register()
    theirs = await domain.code(other, ttl=timedelta(days=1), request_id=request_id)
    assert theirs.owner_id == other.id


async def test_concurrent_retries_of_one_create_return_one_code(domain: Domain) -> None:
    owner = await domain.register()
    request_id = str(uuid.uuid4())
    codes = await asyncio.gather(
        *(domain.code(owner, code="BURST1", request_id=request_id) for _ in range(4))
    )
    assert len({code.id for code in codes}) == 1


async def test_a_code_for_an_account_that_is_gone(domain: Domain) -> None:
    error = await raises(
        NotFound, domain.referrals.create_code(CreateCodeCommand(999, ttl=timedelta(days=1)))
    )
    assert error.reason is Reason.USER_NOT_FOUND


# --- read and delete ---------------------------------------------------------------------------


async def test_my_code_without_one(domain: Domain) -> None:
    owner = await domain.register()
    error = await raises(NotFound, domain.referrals.my_code(owner.id))
    assert error.reason is Reason.REFERRAL_CODE_NOT_FOUND


async def test_delete_revokes_the_code(domain: Domain) -> None:
    owner = await domain.register()
    code = await domain.code(owner)
    await domain.referrals.delete_code(owner.id)
    await raises(NotFound, domain.referrals.my_code(owner.id))
    async with domain.store.read() as uow:
        stored = await uow.codes.get(code.id)
    assert stored is not None
    assert stored.revoke_time == domain.clock()
    again = await raises(NotFound, domain.referrals.delete_code(owner.id))
    assert again.reason is Reason.REFERRAL_CODE_NOT_FOUND
    await domain.code(owner)  # the slot is free


# --- look-up by email, through the cache -------------------------------------------------------


def _key(email: str) -> str:
    return f"public-code-by-email:{email.lower()}"


async def test_a_miss_fills_the_cache_and_a_hit_needs_no_store(domain: Domain) -> None:
    owner = await domain.register()
    code = await domain.code(owner, ttl=timedelta(days=1))
    public = PublicCode(code=code.code, expire_time=code.expire_time)
    assert await domain.referrals.code_by_email(owner.email.upper()) == public
    assert [(key, ttl) for key, _value, ttl in domain.cache.fills] == [
        (_key(owner.email), CACHE_TTL.total_seconds())
    ]
    # Only what the look-up shows anyone is cached: no owner, no counts, no creation time.
    [(_, value, _)] = domain.cache.fills
    assert json.loads(value) == {"c": code.code, "et": code.expire_time.timestamp()}
    domain.store.down = True  # a hit is served without the store
    assert await domain.referrals.code_by_email(owner.email) == public
    assert len(domain.cache.fills) == 1


async def test_the_cache_never_outlives_the_code(domain: Domain) -> None:
    owner = await domain.register()
    await domain.code(owner, ttl=timedelta(minutes=2))
    await domain.referrals.code_by_email(owner.email)
    [(_k, _v, ttl)] = domain.cache.fills
    assert ttl == 120
    # Served until the code expires, not a moment longer.
    domain.clock.advance(seconds=119)
    await domain.referrals.code_by_email(owner.email)
    domain.clock.advance(seconds=1)
    error = await raises(NotFound, domain.referrals.code_by_email(owner.email))
    assert error.reason is Reason.REFERRAL_CODE_NOT_FOUND


async def test_no_code_is_cached_briefly_and_creating_one_invalidates_it(domain: Domain) -> None:
    owner = await domain.register()
    await raises(NotFound, domain.referrals.code_by_email(owner.email))
    assert domain.cache.fills == [(_key(owner.email), b"", NEGATIVE_CACHE_TTL.total_seconds())]
    code = await domain.code(owner)
    assert _key(owner.email) in domain.cache.invalidations
    assert await domain.referrals.code_by_email(owner.email) == PublicCode.of(code)


async def test_deleting_a_code_invalidates_the_cached_copy(domain: Domain) -> None:
    owner = await domain.register()
    await domain.code(owner)
    await domain.referrals.code_by_email(owner.email)  # cached
    await domain.referrals.delete_code(owner.id)
    error = await raises(NotFound, domain.referrals.code_by_email(owner.email))
    assert error.reason is Reason.REFERRAL_CODE_NOT_FOUND


async def test_using_a_code_invalidates_the_cached_copy(domain: Domain) -> None:
    owner = await domain.register()
    await domain.code(owner, code="USED1", max_uses=2)
    await domain.referrals.code_by_email(owner.email)  # cached
    await domain.register(referral_code="USED1")
    assert domain.cache.invalidations.count(_key(owner.email)) == 2  # created, used
    assert (await domain.referrals.code_by_email(owner.email)).code == "USED1"
    await domain.register(referral_code="USED1")
    # Used up: not served, neither from the store nor from a stale cached copy.
    await raises(NotFound, domain.referrals.code_by_email(owner.email))


async def test_a_cache_outage_is_served_from_the_store(domain: Domain) -> None:
    owner = await domain.register()
    code = await domain.code(owner)
    domain.cache.down = True
    assert await domain.referrals.code_by_email(owner.email) == PublicCode.of(code)
    assert domain.cache.fills == []


async def test_look_up_validates_the_email(domain: Domain) -> None:
    error = await raises(InvalidArgument, domain.referrals.code_by_email("not an email"))
    assert [v.field for v in error.violations] == ["email"]
    await raises(NotFound, domain.referrals.code_by_email("nobody@example.com"))
