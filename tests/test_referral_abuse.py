"""Attacks on referral codes, played through the wire (security review, issue 12):

- self-referral through an alias of the owner's own mailbox (``+tag``, Gmail dots,
  googlemail.com) (#8);
- what an anonymous caller learns: the public look-up returns only what a referee needs, and
  Register's answers about a dead code never depend on who registers (#12).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import duration_pb2
from referral.v1 import referral_pb2

from tests.conftest import Api, bearer
from tests.errors import RichError, expect_error

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
