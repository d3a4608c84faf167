"""Attacks on referral codes, played through the wire (security review, issue 12):

- self-referral through an alias of the owner's own mailbox (``+tag``, Gmail dots,
  googlemail.com) (#8);
- what an anonymous caller learns: the public look-up returns only what a referee needs, and
  Register's answers about a dead code never depend on who registers (#12);
- vanity codes burned forever: create/delete are limited per user, and an owner (only the
  owner) may issue their own dead code again (#10).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2
from referral.v1 import referral_pb2

from referral_service.config import RateLimitSettings
from tests.conftest import Api, Stack, bearer, start_api, stop_api
from tests.errors import RichError, expect_error, rich
from tests.invariants import check_invariants

RC = referral_pb2.ReferralCode
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
LIMITED = grpc.StatusCode.RESOURCE_EXHAUSTED
TAKEN = grpc.StatusCode.ALREADY_EXISTS


async def create(api: Api, token: str, **fields: Any) -> referral_pb2.ReferralCode:
    response = await api.referral.CreateReferralCode(
        referral_pb2.CreateReferralCodeRequest(ttl=duration_pb2.Duration(seconds=3600), **fields),
        metadata=bearer(token),
    )
    return response.referral_code


async def delete(api: Api, token: str) -> None:
    await api.referral.DeleteReferralCode(referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(token))


async def lookup(api: Api, email: str) -> referral_pb2.ReferralCode:
    response = await api.referral.GetReferralCodeByEmail(
        referral_pb2.GetReferralCodeByEmailRequest(email=email)
    )
    return response.referral_code


async def mine(api: Api, token: str) -> referral_pb2.ReferralCode:
    response = await api.referral.GetMyReferralCode(
        referral_pb2.GetMyReferralCodeRequest(), metadata=bearer(token)
    )
    return response.referral_code


async def referral_codes(api: Api, owner_id: int, token: str) -> list[str]:
    page = await api.referral.ListReferrals(
        referral_pb2.ListReferralsRequest(referrer_id=owner_id), metadata=bearer(token)
    )
    return [referral.code for referral in page.referrals]


async def not_registered(api: Api, email: str) -> None:
    await expect_error(api.login(email), grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")


def _answer(error: RichError) -> tuple[object, ...]:
    return (error.code, error.reason, error.message, error.metadata, error.fields)


# --- #8: self-referral through aliases of the owner's mailbox ---------------------------------------


async def test_self_referral_through_an_alias_of_the_owners_mailbox_is_refused(api: Api) -> None:
    name = f"a.b{uuid.uuid4().hex[:8]}"  # owner: a.b<hex>+x@gmail.com
    owner_email = f"{name}+x@gmail.com"
    owner, token = await api.user_with_token(owner_email)
    code = await create(api, token, code=f"AB{name[3:]}")
    mailbox = name.replace(".", "")
    aliases = [
        f"{mailbox}+other@googlemail.com",  # the attack of the review
        f"{mailbox}@gmail.com",
        f"{'.'.join(mailbox)}@GMail.com",
        f"{name.upper()}+x+y@gmail.com",
    ]
    for alias in aliases:
        error = await expect_error(api.register(alias, referral_code=code.code), INVALID, "SELF_REFERRAL")
        assert error.field_reasons["referral_code"] == "SELF_REFERRAL"
        await not_registered(api, alias)
    assert await referral_codes(api, owner.id, token) == []
    assert (await mine(api, token)).use_count == 0

    # Genuinely different mailboxes are referrals.
    for other in (f"{mailbox}0@gmail.com", f"{mailbox}@outlook.com", f"{name}@example.com"):
        referred = await api.register(other, referral_code=code.code)
        assert referred.referrer_id == owner.id
    assert (await mine(api, token)).use_count == 3

    # Accounts and log-in keep the address as typed: the owner logs in with theirs, an alias is
    # not their account, and the canonical mailbox may register an account of its own.
    await api.login(owner_email)
    await api.login(owner_email.upper())
    await not_registered(api, f"{mailbox}@gmail.com")
    separate = await api.register(f"{mailbox}@gmail.com")
    assert separate.id != owner.id
    await api.login(f"{mailbox}@gmail.com")


# --- #12: what the public look-up reveals -----------------------------------------------------------


@pytest.mark.all_stacks
async def test_the_public_lookup_returns_only_code_expiry_and_state(api: Api) -> None:
    email = api.unique_email("owner")
    owner, token = await api.user_with_token(email)
    code = await create(api, token, max_uses=5)
    await api.register(referral_code=code.code)  # use_count 1
    expected = RC(code=code.code, expire_time=code.expire_time, state=RC.STATE_ACTIVE)
    for _ in range(3):  # a miss (from the database), then hits (from the cache)
        found = await lookup(api, email)
        assert found == expected
        assert {field.name for field, _ in found.ListFields()} == {"code", "expire_time", "state"}
        assert not found.HasField("create_time")
        assert (found.owner_id, found.max_uses, found.use_count) == (0, 0, 0)
    # The owner still sees everything of their own code.
    own = await mine(api, token)
    assert (own.owner_id, own.max_uses, own.use_count) == (owner.id, 5, 1)
    assert own.HasField("create_time")

    if api.stack.redis_url:  # what the shared cache holds is no more than the look-up shows
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(api.stack.redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{api.stack.redis_prefix}v:*")]
            values = [await client.get(key) for key in keys]
        finally:
            await client.aclose()
        cached = [json.loads(value.split(b"|", 1)[1]) for value in values if value and b"|{" in value]
        assert [(set(value), value["c"]) for value in cached] == [({"c", "et"}, code.code)]


async def test_the_public_lookup_over_http_shows_only_code_expiry_and_state(api: Api) -> None:
    email = api.unique_email("owner")
    _, token = await api.user_with_token(email)
    code = await create(api, token, max_uses=5)
    await api.register(referral_code=code.code)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}", timeout=30) as http:
        for _ in range(2):
            response = await http.get(f"/v1/referral-codes/by-email/{email}")
            assert response.status_code == 200, response.text
            assert response.json() == {
                "referralCode": {
                    "code": code.code,
                    "expireTime": code.expire_time.ToJsonString(),
                    "state": "STATE_ACTIVE",
                }
            }
        # The owner's own read still prints every field, zeros included.
        own = await http.get("/v1/users/me/referral-code", headers={"Authorization": f"Bearer {token}"})
        assert own.status_code == 200, own.text
        assert set(own.json()["referralCode"]) == {
            "code",
            "ownerId",
            "createTime",
            "expireTime",
            "maxUses",
            "useCount",
            "state",
        }


async def test_a_dead_code_gives_its_state_whoever_registers_never_self_referral(api: Api) -> None:
    """The review: Register checked the self-referral rule before liveness, so an anonymous
    caller could ask "does this email own that deleted code?". A dead code now answers with its
    state, the same for the owner's address, an alias of it, and a stranger's."""
    name = f"own.er{uuid.uuid4().hex[:8]}"
    owner_email = f"{name}@gmail.com"
    owner, token = await api.user_with_token(owner_email)
    revoked = await create(api, token, code=f"DEL{name[6:]}")
    await delete(api, token)
    used_up = await create(api, token, code=f"USE{name[6:]}", max_uses=1)
    await api.register(referral_code=used_up.code)

    for code, reason in ((revoked.code, "REFERRAL_CODE_REVOKED"), (used_up.code, "REFERRAL_CODE_EXHAUSTED")):
        answers = []
        for email in (
            owner_email.upper(),
            f"{name.replace('.', '')}+probe@googlemail.com",
            api.unique_email(),
        ):
            error = await expect_error(api.register(email, referral_code=code), PRECONDITION, reason)
            answers.append(_answer(error))
        assert answers[0] == answers[1] == answers[2]
    # A live code: the owner's own mailbox is told it is their code (as the look-up tells anyone).
    await delete(api, token)
    live = await create(api, token)
    assert (await lookup(api, owner_email)).code == live.code
    await expect_error(api.register(owner_email, referral_code=live.code), INVALID, "SELF_REFERRAL")
    assert (await mine(api, token)).use_count == 0
    assert await referral_codes(api, owner.id, token) == [used_up.code]


# --- #10: vanity codes burned forever ---------------------------------------------------------------


def assert_quota(error: RichError, name: str, value: int) -> None:
    assert error.reason == "RATE_LIMITED"
    assert error.metadata["quota_limit"] == name
    assert error.metadata["quota_subject"] == "user"
    assert error.retry_seconds is not None
    assert error.retry_seconds > 0
    assert error.quota == [("user", name, value)]


async def test_code_creates_and_deletes_are_limited_per_user(stack: Stack) -> None:
    api = await start_api(
        stack,
        rate_limit_code_create_user="4/1h",
        rate_limit_code_delete_user="4/1h",
        rate_limit_vanity_code_user="2/1d",
    )
    try:
        _, token = await api.user_with_token()
        for _ in range(4):
            await create(api, token)
            await delete(api, token)
        error = await expect_error(create(api, token), LIMITED)
        assert_quota(error, "code-create-user", 4)
        error = await expect_error(delete(api, token), LIMITED)
        assert_quota(error, "code-delete-user", 4)

        # Vanity codes issued have their own, tighter budget (a refused request does not count).
        _, vanity = await api.user_with_token()
        _, other = await api.user_with_token()
        await create(api, other, code="TAKEN-BRAND")
        await expect_error(create(api, vanity, code="taken-brand"), TAKEN, "REFERRAL_CODE_TAKEN")
        await create(api, vanity, code="BRAND-ONE")
        await delete(api, vanity)
        await create(api, vanity, code="BRAND-TWO")
        await delete(api, vanity)
        error = await expect_error(create(api, vanity, code="BRAND-THREE"), LIMITED)
        assert_quota(error, "vanity-code-user", 2)

        # A generated code is not a vanity code (the refused call gave its create back: 4 of 4)...
        await create(api, vanity)
        # ...and limits are per user: a fresh account from the same address is not affected.
        _, fresh = await api.user_with_token()
        await create(api, fresh, code="BRAND-THREE")
    finally:
        await stop_api(api)


async def test_the_default_limits_stop_a_script_reserving_brand_codes(stack: Stack) -> None:
    """The review's script reserved 9 brand-like codes in 0.19 s by creating and deleting."""
    defaults = {
        f"rate_limit_{name}": str(RateLimitSettings.model_fields[name].default)
        for name in ("code_create_user", "code_delete_user", "vanity_code_user")
    }
    api = await start_api(stack, **defaults)
    try:
        _, token = await api.user_with_token()
        reserved: list[str] = []
        refused: list[RichError] = []
        for brand in ("ACME", "GLOBEX", "INITECH", "UMBRELLA", "HOOLI", "STARK", "WAYNE", "WONKA", "TYRELL"):
            try:
                reserved.append((await create(api, token, code=brand)).code)
            except grpc.aio.AioRpcError as error:
                refused.append(rich(error))
                continue
            await delete(api, token)
        assert len(reserved) == 5
        assert [(e.code, e.metadata["quota_limit"]) for e in refused] == [(LIMITED, "vanity-code-user")] * 4
    finally:
        await stop_api(api)


async def test_an_owner_reissues_their_deleted_vanity_code_and_nobody_else_can(api: Api) -> None:
    owner, token = await api.user_with_token()
    _, squatter = await api.user_with_token()
    first = await create(api, token, code="Launch-X", max_uses=10)
    await api.register(referral_code="launch-x")
    await delete(api, token)

    await expect_error(create(api, squatter, code="LAUNCH-X"), TAKEN, "REFERRAL_CODE_TAKEN")
    again = await create(api, token, code="launch-x", max_uses=3)
    assert (again.code, again.state, again.use_count, again.max_uses) == ("LAUNCH-X", RC.STATE_ACTIVE, 0, 3)
    assert again.create_time.ToDatetime() > first.create_time.ToDatetime()
    assert (await lookup(api, owner.email)).code == "LAUNCH-X"
    referred = await api.register(referral_code="LAUNCH-X")
    assert referred.referrer_id == owner.id
    # The earlier referral keeps its code; the reissued code counts only its own uses.
    assert await referral_codes(api, owner.id, token) == ["LAUNCH-X", "LAUNCH-X"]
    assert (await mine(api, token)).use_count == 1

    # Deleted again, still the owner's alone, and again theirs to reissue.
    await delete(api, token)
    await expect_error(create(api, squatter, code="launch-x"), TAKEN, "REFERRAL_CODE_TAKEN")
    await expect_error(
        api.register(api.unique_email(), referral_code="LAUNCH-X"), PRECONDITION, "REFERRAL_CODE_REVOKED"
    )
    await create(api, token, code="LAUNCH-X")
    await check_invariants(api.app.db)


@pytest.mark.all_stacks
async def test_a_reissue_racing_squatters_stays_with_the_owner(api: Api) -> None:
    _, token = await api.user_with_token()
    squatters = [(await api.user_with_token())[1] for _ in range(5)]
    await create(api, token, code="HOTBRAND")
    await delete(api, token)
    results = await asyncio.gather(
        create(api, token, code="HOTBRAND"),
        *(create(api, squatter, code="hotbrand") for squatter in squatters),
        return_exceptions=True,
    )
    assert isinstance(results[0], RC), results[0]
    assert {r.code() for r in results[1:] if isinstance(r, grpc.aio.AioRpcError)} == {TAKEN}
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results[1:])
    assert (await mine(api, token)).code == "HOTBRAND"
    await check_invariants(api.app.db)
