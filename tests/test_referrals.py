"""ReferralService through the wire: codes, expiry, lookup by email through the cache,
registration with a code, paginated referrals."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from referral.v1 import auth_pb2, referral_pb2
from sqlalchemy import event

from referral_service.domain.referrals import CODE_ALPHABET
from tests.conftest import PASSWORD, Api, bearer
from tests.errors import expect_error

RC = referral_pb2.ReferralCode
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def ttl(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromTimedelta(timedelta(seconds=seconds))
    return value


def at(moment: datetime) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(moment)
    return value


async def create(api: Api, token: str, **fields: object) -> referral_pb2.ReferralCode:
    if "expire_time" not in fields and "ttl" not in fields:
        fields["ttl"] = ttl(3600)
    response = await api.referral.CreateReferralCode(
        referral_pb2.CreateReferralCodeRequest(**fields),
        metadata=bearer(token),  # type: ignore[arg-type]
    )
    return response.referral_code


async def lookup(api: Api, email: str) -> referral_pb2.ReferralCode:
    response = await api.referral.GetReferralCodeByEmail(
        referral_pb2.GetReferralCodeByEmailRequest(email=email)
    )
    return response.referral_code


# --- create ---------------------------------------------------------------------------------------


async def test_create_generates_an_unambiguous_code(api: Api) -> None:
    user, token = await api.user_with_token()
    before = datetime.now(UTC)
    code = await create(api, token, ttl=ttl(86400))
    assert len(code.code) == 10
    assert set(code.code) <= set(CODE_ALPHABET)
    assert not set(code.code) & set("01OIL")
    assert code.owner_id == user.id
    assert code.state == RC.STATE_ACTIVE
    assert code.max_uses == 0
    assert code.use_count == 0
    expires = code.expire_time.ToDatetime(tzinfo=UTC)
    assert (
        before + timedelta(days=1) - timedelta(seconds=5) <= expires <= datetime.now(UTC) + timedelta(days=1)
    )


async def test_create_with_absolute_expiry_and_max_uses(api: Api) -> None:
    _, token = await api.user_with_token()
    expiry = (datetime.now(UTC) + timedelta(days=7)).replace(microsecond=0)
    code = await create(api, token, code="Summer-2026", expire_time=at(expiry), max_uses=5)
    assert code.code == "SUMMER-2026"
    assert code.expire_time.ToDatetime(tzinfo=UTC) == expiry
    assert code.max_uses == 5
    mine = await api.referral.GetMyReferralCode(
        referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(token)
    )
    assert mine.referral_code == code


@pytest.mark.parametrize(
    ("fields", "field", "reason"),
    [
        ({"code": "abc"}, "code", "INVALID_LENGTH"),
        ({"code": "x" * 33}, "code", "INVALID_LENGTH"),
        ({"code": "has space"}, "code", "INVALID_CHARACTERS"),
        ({"code": "-leading"}, "code", "INVALID_CHARACTERS"),
        ({"code": "ünïcode"}, "code", "INVALID_CHARACTERS"),
        ({"code": "abc'; DROP TABLE users;--"}, "code", "INVALID_CHARACTERS"),
        ({"code": "nul\x00code"}, "code", "INVALID_CHARACTERS"),
        ({"max_uses": -1}, "max_uses", "NEGATIVE"),
        ({"ttl": ttl(-60)}, "ttl", "NOT_POSITIVE"),
        ({"ttl": ttl(0)}, "ttl", "NOT_POSITIVE"),
        ({"ttl": ttl(400 * 86400)}, "ttl", "TOO_FAR"),
        # issue 12 #6: a valid Duration past the year 9999 from now overflowed into INTERNAL
        ({"ttl": duration_pb2.Duration(seconds=300_000_000_000)}, "ttl", "TOO_FAR"),
        ({"ttl": duration_pb2.Duration(seconds=315_576_000_000, nanos=999_999_999)}, "ttl", "TOO_FAR"),
        ({"ttl": duration_pb2.Duration(seconds=315_576_000_001)}, "ttl", "INVALID"),
        ({"ttl": duration_pb2.Duration(seconds=-(2**63))}, "ttl", "INVALID"),
        ({"ttl": duration_pb2.Duration(seconds=60, nanos=-1)}, "ttl", "INVALID"),
        ({"ttl": duration_pb2.Duration(seconds=60, nanos=1_000_000_000)}, "ttl", "INVALID"),
        ({"ttl": duration_pb2.Duration(seconds=-60, nanos=-999_999_999)}, "ttl", "NOT_POSITIVE"),
        ({"expire_time": at(datetime.now(UTC) - timedelta(minutes=1))}, "expire_time", "IN_PAST"),
        ({"expire_time": at(datetime.now(UTC) + timedelta(days=366))}, "expire_time", "TOO_FAR"),
        (
            {"expire_time": timestamp_pb2.Timestamp(seconds=253_402_300_799, nanos=999_999_999)},
            "expire_time",
            "TOO_FAR",
        ),
        ({"expire_time": timestamp_pb2.Timestamp(seconds=-62_135_596_800)}, "expire_time", "IN_PAST"),
        ({"expire_time": timestamp_pb2.Timestamp(seconds=253_402_300_800)}, "expire_time", "INVALID"),
        ({"expire_time": timestamp_pb2.Timestamp(seconds=-62_135_596_801)}, "expire_time", "INVALID"),
        ({"expire_time": timestamp_pb2.Timestamp(seconds=2**63 - 1)}, "expire_time", "INVALID"),
        ({"expire_time": timestamp_pb2.Timestamp(seconds=2_000_000_000, nanos=-1)}, "expire_time", "INVALID"),
        ({"request_id": "retry-1"}, "request_id", "INVALID_FORMAT"),
    ],
)
async def test_create_rejects_bad_input(api: Api, fields: dict[str, object], field: str, reason: str) -> None:
    _, token = await api.user_with_token()
    error = await expect_error(create(api, token, **fields), INVALID, "VALIDATION_FAILED")
    assert error.field_reasons[field] == reason
    await expect_error(
        api.referral.GetMyReferralCode(referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(token)),
        NOT_FOUND,
    )


async def test_create_requires_an_expiry(api: Api) -> None:
    _, token = await api.user_with_token()
    error = await expect_error(
        api.referral.CreateReferralCode(referral_pb2.CreateReferralCodeRequest(), metadata=bearer(token)),
        INVALID,
        "VALIDATION_FAILED",
    )
    assert error.field_reasons["expire_time"] == "REQUIRED"


async def test_create_requires_a_token(api: Api) -> None:
    await expect_error(
        api.referral.CreateReferralCode(referral_pb2.CreateReferralCodeRequest(ttl=ttl(60))),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_MISSING",
    )


async def test_only_one_live_code_per_user(api: Api) -> None:
    _, token = await api.user_with_token()
    first = await create(api, token)
    error = await expect_error(create(api, token), PRECONDITION, "REFERRAL_CODE_ALREADY_ACTIVE")
    assert "delete" in error.message
    mine = await api.referral.GetMyReferralCode(
        referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(token)
    )
    assert mine.referral_code.code == first.code


@pytest.mark.all_stacks
async def test_fifty_concurrent_creates_yield_exactly_one_live_code(api: Api) -> None:
    _, token = await api.user_with_token()
    results = await asyncio.gather(*(create(api, token) for _ in range(50)), return_exceptions=True)
    created = [r for r in results if isinstance(r, referral_pb2.ReferralCode)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(created) == 1, [f.details() for f in failed][:3]
    assert {f.code() for f in failed} == {PRECONDITION}
    mine = await api.referral.GetMyReferralCode(
        referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(token)
    )
    assert mine.referral_code.code == created[0].code


async def test_concurrent_equal_vanity_codes_go_to_exactly_one_user(api: Api) -> None:
    tokens = [(await api.user_with_token())[1] for _ in range(6)]
    results = await asyncio.gather(*(create(api, t, code="LAUNCH") for t in tokens), return_exceptions=True)
    assert sum(isinstance(r, referral_pb2.ReferralCode) for r in results) == 1
    codes = {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)}
    assert codes == {grpc.StatusCode.ALREADY_EXISTS}


async def test_vanity_codes_are_never_reissued_to_anyone_else(api: Api) -> None:
    _owner, token = await api.user_with_token()
    await create(api, token, code="friends")
    # asking again for one's own live code: one live code per user
    await expect_error(create(api, token, code="Friends"), PRECONDITION, "REFERRAL_CODE_ALREADY_ACTIVE")
    await api.referral.DeleteReferralCode(referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(token))
    _, other = await api.user_with_token()
    error = await expect_error(
        create(api, other, code="FRIENDS"), grpc.StatusCode.ALREADY_EXISTS, "REFERRAL_CODE_TAKEN"
    )
    assert error.fields["code"]


async def test_an_expired_code_does_not_block_a_new_one(api: Api) -> None:
    _, token = await api.user_with_token()
    await create(api, token, ttl=ttl(1))
    await asyncio.sleep(1.2)
    mine = await api.referral.GetMyReferralCode(
        referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(token)
    )
    assert mine.referral_code.state == RC.STATE_EXPIRED
    fresh = await create(api, token)
    assert fresh.state == RC.STATE_ACTIVE


async def test_a_used_up_code_does_not_block_a_new_one(api: Api) -> None:
    _, token = await api.user_with_token()
    code = await create(api, token, max_uses=1)
    await api.register(referral_code=code.code)
    mine = await api.referral.GetMyReferralCode(
        referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(token)
    )
    assert mine.referral_code.state == RC.STATE_EXHAUSTED
    assert mine.referral_code.use_count == 1
    await create(api, token)


async def test_create_retry_with_request_id_returns_the_first_code(api: Api) -> None:
    _, token = await api.user_with_token()
    request_id = str(uuid.uuid4())
    first = await create(api, token, request_id=request_id)
    again = await create(api, token, request_id=request_id)
    assert again == first
    await expect_error(create(api, token, request_id=request_id, max_uses=3), INVALID, "REQUEST_ID_CONFLICT")


# --- get mine / delete ------------------------------------------------------------------------------


async def test_get_and_delete_my_code(api: Api) -> None:
    _, token = await api.user_with_token()
    await expect_error(
        api.referral.GetMyReferralCode(referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(token)),
        NOT_FOUND,
        "REFERRAL_CODE_NOT_FOUND",
    )
    await expect_error(
        api.referral.DeleteReferralCode(referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(token)),
        NOT_FOUND,
        "REFERRAL_CODE_NOT_FOUND",
    )
    await create(api, token)
    await api.referral.DeleteReferralCode(referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(token))
    await expect_error(
        api.referral.GetMyReferralCode(referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(token)),
        NOT_FOUND,
    )
    await expect_error(
        api.referral.DeleteReferralCode(referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(token)),
        NOT_FOUND,
    )
    await create(api, token)  # the slot is free again


# --- lookup by email and the cache ------------------------------------------------------------------------


@pytest.mark.all_stacks
async def test_lookup_by_email_is_public_and_case_insensitive(api: Api) -> None:
    email = api.unique_email("Referrer")
    _, token = await api.user_with_token(email)
    code = await create(api, token)
    public = RC(code=code.code, expire_time=code.expire_time, state=RC.STATE_ACTIVE)
    for variant in (email, email.upper(), f"  {email.lower()}  "):
        found = await lookup(api, variant)
        assert found == public


@pytest.mark.all_stacks
async def test_lookup_not_found_is_the_same_for_unknown_email_and_no_code(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    unknown = await expect_error(lookup(api, "nobody@example.com"), NOT_FOUND, "REFERRAL_CODE_NOT_FOUND")
    no_code = await expect_error(lookup(api, email), NOT_FOUND, "REFERRAL_CODE_NOT_FOUND")
    assert unknown.message == no_code.message


async def test_lookup_rejects_an_invalid_email(api: Api) -> None:
    error = await expect_error(lookup(api, "not an email"), INVALID, "VALIDATION_FAILED")
    assert "email" in error.fields


@pytest.mark.all_stacks
async def test_a_deleted_code_is_never_served_from_the_cache(api: Api) -> None:
    email = api.unique_email()
    _, token = await api.user_with_token(email)
    await create(api, token)
    for _ in range(5):
        await lookup(api, email)  # warm the cache
    await api.referral.DeleteReferralCode(referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(token))
    results = await asyncio.gather(*(lookup(api, email) for _ in range(300)), return_exceptions=True)
    assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == NOT_FOUND for r in results)


@pytest.mark.all_stacks
async def test_lookups_racing_a_delete_never_resurrect_the_code(api: Api) -> None:
    email = api.unique_email()
    _, token = await api.user_with_token(email)
    await create(api, token)

    async def hammer() -> None:
        for _ in range(40):
            try:
                await lookup(api, email)
            except grpc.aio.AioRpcError as error:
                assert error.code() == NOT_FOUND

    readers = [asyncio.create_task(hammer()) for _ in range(5)]
    await asyncio.sleep(0.01)
    await api.referral.DeleteReferralCode(referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(token))
    await asyncio.gather(*readers)
    for _ in range(20):
        await expect_error(lookup(api, email), NOT_FOUND)


@pytest.mark.all_stacks
async def test_a_cached_not_found_is_invalidated_by_create(api: Api) -> None:
    email = api.unique_email()
    _, token = await api.user_with_token(email)
    await expect_error(lookup(api, email), NOT_FOUND)  # cached "no code"
    code = await create(api, token)
    assert (await lookup(api, email)).code == code.code


@pytest.mark.all_stacks
async def test_the_cache_never_outlives_the_code(api: Api) -> None:
    email = api.unique_email()
    _, token = await api.user_with_token(email)
    await create(api, token, ttl=ttl(1))
    await lookup(api, email)
    await asyncio.sleep(1.2)
    await expect_error(lookup(api, email), NOT_FOUND)


@pytest.mark.all_stacks
async def test_a_used_up_code_leaves_the_lookup(api: Api) -> None:
    email = api.unique_email()
    _, token = await api.user_with_token(email)
    code = await create(api, token, max_uses=2)
    assert (await lookup(api, email)).code == code.code  # cached
    await api.register(referral_code=code.code)
    assert (await lookup(api, email)).code == code.code
    await api.register(referral_code=code.code)
    await expect_error(lookup(api, email), NOT_FOUND)  # used up: no longer live


@pytest.mark.all_stacks
async def test_a_cache_hit_opens_no_database_session(api: Api) -> None:
    email = api.unique_email()
    _, token = await api.user_with_token(email)
    await create(api, token)
    await lookup(api, email)
    checkouts = []
    engine = api.app.db.engine.sync_engine
    listener = lambda *args: checkouts.append(1)  # noqa: E731
    event.listen(engine, "checkout", listener)
    try:
        for _ in range(10):
            await lookup(api, email)
    finally:
        event.remove(engine, "checkout", listener)
    assert checkouts == []


# --- register with a code -------------------------------------------------------------------------------


async def test_register_with_a_code_makes_a_referral(api: Api) -> None:
    owner, token = await api.user_with_token()
    code = await create(api, token)
    referral = await api.register(referral_code=code.code.lower())  # codes are case-insensitive
    assert referral.referrer_id == owner.id
    page = await api.referral.ListReferrals(
        referral_pb2.ListReferralsRequest(referrer_id=owner.id), metadata=bearer(token)
    )
    assert [r.user_id for r in page.referrals] == [referral.id]
    assert page.referrals[0].code == code.code
    assert page.referrals[0].email == referral.email
    assert page.total_size == 1


async def _assert_not_registered(api: Api, email: str) -> None:
    await expect_error(api.login(email), grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")


async def test_register_with_an_unknown_code_creates_no_user(api: Api) -> None:
    email = api.unique_email()
    error = await expect_error(
        api.register(email, referral_code="NOSUCHCODE"), INVALID, "REFERRAL_CODE_UNKNOWN"
    )
    assert "referral_code" in error.fields
    await _assert_not_registered(api, email)
    await expect_error(api.register(email, referral_code="bad code!"), INVALID, "VALIDATION_FAILED")
    await api.register(email)  # the email is still free


async def test_register_with_an_expired_code(api: Api) -> None:
    _, token = await api.user_with_token()
    code = await create(api, token, ttl=ttl(1))
    await asyncio.sleep(1.2)
    email = api.unique_email()
    await expect_error(api.register(email, referral_code=code.code), PRECONDITION, "REFERRAL_CODE_EXPIRED")
    await _assert_not_registered(api, email)


async def test_register_with_a_deleted_code(api: Api) -> None:
    _, token = await api.user_with_token()
    code = await create(api, token)
    await api.referral.DeleteReferralCode(referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(token))
    email = api.unique_email()
    await expect_error(api.register(email, referral_code=code.code), PRECONDITION, "REFERRAL_CODE_REVOKED")
    await _assert_not_registered(api, email)


async def test_register_with_own_code_is_refused(api: Api) -> None:
    email = api.unique_email()
    _, token = await api.user_with_token(email)
    code = await create(api, token)
    await expect_error(api.register(email.upper(), referral_code=code.code), INVALID, "SELF_REFERRAL")


@pytest.mark.all_stacks
async def test_concurrent_registrations_never_exceed_max_uses(api: Api) -> None:
    owner, token = await api.user_with_token()
    code = await create(api, token, max_uses=3)
    results = await asyncio.gather(
        *(api.register(referral_code=code.code) for _ in range(10)), return_exceptions=True
    )
    ok = [r for r in results if isinstance(r, auth_pb2.User)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 3
    assert {f.code() for f in failed} == {PRECONDITION}
    mine = await api.referral.GetMyReferralCode(
        referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(token)
    )
    assert mine.referral_code.use_count == 3
    assert mine.referral_code.state == RC.STATE_EXHAUSTED
    page = await api.referral.ListReferrals(
        referral_pb2.ListReferralsRequest(referrer_id=owner.id), metadata=bearer(token)
    )
    assert page.total_size == 3


# --- list referrals ---------------------------------------------------------------------------------------


async def _seed_referrals(api: Api, owner_id: int, count: int) -> list[int]:
    """Seed referrals straight into the database (hashing 300 passwords through the API would
    only slow the suite down); a few more go through Register in the tests themselves."""
    from referral_service.domain.clock import utcnow
    from referral_service.domain.ports import NewUser, UnitOfWork

    now = utcnow()

    async def seed(uow: UnitOfWork) -> list[int]:
        ids = []
        for i in range(count):
            email = f"seeded{i}-{uuid.uuid4().hex[:6]}@example.com"
            user = await uow.users.add(
                NewUser(
                    email=email,
                    email_key=email,
                    password_hash="$argon2id$v=19$m=19456,t=2,p=1$c2VlZA$c2VlZA",
                    referrer_id=owner_id,
                ),
                now,
            )
            await uow.users.count_referral(owner_id)
            ids.append(user.id)
        return ids

    return await api.app.store.transact(seed)


@pytest.mark.parametrize("page_size", [7, 100])
async def test_pagination_walks_every_referral_once_in_order(api: Api, page_size: int) -> None:
    owner, token = await api.user_with_token()
    code = await create(api, token)
    seeded = await _seed_referrals(api, owner.id, 300)
    via_api = [(await api.register(referral_code=code.code)).id for _ in range(3)]
    expected = seeded + via_api
    seen: list[int] = []
    page_token = ""
    pages = 0
    while True:
        page = await api.referral.ListReferrals(
            referral_pb2.ListReferralsRequest(
                referrer_id=owner.id, page_size=page_size, page_token=page_token
            ),
            metadata=bearer(token),
        )
        pages += 1
        assert page.total_size == len(expected)
        assert len(page.referrals) <= page_size
        seen += [r.user_id for r in page.referrals]
        page_token = page.next_page_token
        if not page_token:
            break
    assert seen == expected
    assert pages == -(-len(expected) // page_size)


async def test_page_size_default_cap_and_negative(api: Api) -> None:
    owner, token = await api.user_with_token()
    await _seed_referrals(api, owner.id, 60)
    default = await api.referral.ListReferrals(
        referral_pb2.ListReferralsRequest(referrer_id=owner.id), metadata=bearer(token)
    )
    assert len(default.referrals) == 50
    assert default.next_page_token
    capped = await api.referral.ListReferrals(
        referral_pb2.ListReferralsRequest(referrer_id=owner.id, page_size=100_000),
        metadata=bearer(token),
    )
    assert len(capped.referrals) == 60
    assert not capped.next_page_token
    error = await expect_error(
        api.referral.ListReferrals(
            referral_pb2.ListReferralsRequest(referrer_id=owner.id, page_size=-1),
            metadata=bearer(token),
        ),
        INVALID,
    )
    assert error.field_reasons["page_size"] == "NEGATIVE"


async def test_page_tokens_are_bound_to_their_request(api: Api) -> None:
    owner, token = await api.user_with_token()
    await _seed_referrals(api, owner.id, 5)
    first = await api.referral.ListReferrals(
        referral_pb2.ListReferralsRequest(referrer_id=owner.id, page_size=2), metadata=bearer(token)
    )
    admin_email = api.unique_email("admin")
    await api.app.auth.create_superuser(admin_email, PASSWORD)
    admin = (await api.login(admin_email)).access_token
    other, _ = await api.user_with_token()
    error = await expect_error(
        api.referral.ListReferrals(
            referral_pb2.ListReferralsRequest(referrer_id=other.id, page_token=first.next_page_token),
            metadata=bearer(admin),
        ),
        INVALID,
        "INVALID_PAGE_TOKEN",
    )
    assert "page_token" in error.fields
    for garbage in ("garbage", first.next_page_token[:-2] + "xx", "é" * 10, "a" * 600):
        await expect_error(
            api.referral.ListReferrals(
                referral_pb2.ListReferralsRequest(referrer_id=owner.id, page_token=garbage),
                metadata=bearer(token),
            ),
            INVALID,
        )


async def test_listing_someone_elses_referrals_is_permission_denied_before_not_found(
    api: Api,
) -> None:
    owner, _ = await api.user_with_token()
    _, stranger = await api.user_with_token()
    for referrer_id in (owner.id, 2**31, 2**63 - 1, 999_999):
        await expect_error(
            api.referral.ListReferrals(
                referral_pb2.ListReferralsRequest(referrer_id=referrer_id),
                metadata=bearer(stranger),
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )


async def test_a_superuser_may_list_anyones_referrals(api: Api) -> None:
    owner, token = await api.user_with_token()
    code = await create(api, token)
    referral = await api.register(referral_code=code.code)
    admin_email = api.unique_email("admin")
    await api.app.auth.create_superuser(admin_email, PASSWORD)
    admin = (await api.login(admin_email)).access_token
    page = await api.referral.ListReferrals(
        referral_pb2.ListReferralsRequest(referrer_id=owner.id), metadata=bearer(admin)
    )
    assert [r.user_id for r in page.referrals] == [referral.id]
    for missing in (2**31, 2**63 - 1):
        await expect_error(
            api.referral.ListReferrals(
                referral_pb2.ListReferralsRequest(referrer_id=missing), metadata=bearer(admin)
            ),
            NOT_FOUND,
            "USER_NOT_FOUND",
        )
    for bad in (0, -5):
        await expect_error(
            api.referral.ListReferrals(
                referral_pb2.ListReferralsRequest(referrer_id=bad), metadata=bearer(admin)
            ),
            INVALID,
        )


async def test_listing_with_no_referrals(api: Api) -> None:
    owner, token = await api.user_with_token()
    page = await api.referral.ListReferrals(
        referral_pb2.ListReferralsRequest(referrer_id=owner.id), metadata=bearer(token)
    )
    assert list(page.referrals) == []
    assert page.next_page_token == ""
    assert page.total_size == 0
