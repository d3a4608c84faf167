"""Redis is an accelerator, never a dependency: outages (refused, hanging, restarted empty)
cost cache hits, never a wrong answer or an error. Redis is reached through a loopback proxy
the tests cut and restore."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from urllib.parse import urlsplit

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2
from referral.v1 import auth_pb2, referral_pb2

from tests.conftest import REDIS_URL, Api, Stack, bearer, start_api, stop_api
from tests.errors import expect_error
from tests.proxy import Proxy

DEADLINE = 3.0  # every call below must answer within this, Redis up or not


def _ttl(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromTimedelta(timedelta(seconds=seconds))
    return value


@pytest.fixture
async def proxied(stack: Stack) -> AsyncIterator[tuple[Api, Proxy]]:
    if stack.redis_url is None:
        pytest.fail("outage tests need a Redis stack")
    target = urlsplit(REDIS_URL)
    proxy = await Proxy(target.hostname or "127.0.0.1", target.port or 6379).start()
    api = await start_api(stack, redis_url=proxy.url, redis_breaker_reset_seconds=0.5)
    try:
        yield api, proxy
    finally:
        await stop_api(api)
        await proxy.close()


pytestmark = pytest.mark.redis_stacks


async def _lookup(api: Api, email: str) -> referral_pb2.ReferralCode:
    response = await api.referral.GetReferralCodeByEmail(
        referral_pb2.GetReferralCodeByEmailRequest(email=email), timeout=DEADLINE
    )
    return response.referral_code


async def _owner_with_code(api: Api) -> tuple[str, str, referral_pb2.ReferralCode]:
    email = api.unique_email()
    _, token = await api.user_with_token(email)
    response = await api.referral.CreateReferralCode(
        referral_pb2.CreateReferralCodeRequest(ttl=_ttl(3600)), metadata=bearer(token), timeout=DEADLINE
    )
    return email, token, response.referral_code


@pytest.mark.parametrize("failure", ["refuse", "hang"])
async def test_lookups_logins_and_token_checks_survive_a_redis_outage(
    proxied: tuple[Api, Proxy], failure: str
) -> None:
    api, proxy = proxied
    email, _token, code = await _owner_with_code(api)
    assert (await _lookup(api, email)).code == code.code
    getattr(proxy, failure)()
    for _ in range(10):
        assert (await _lookup(api, email)).code == code.code
    tokens = await api.auth.Login(
        auth_pb2.LoginRequest(email=email, password="correct horse battery staple"), timeout=DEADLINE
    )
    me = await api.auth.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token), timeout=DEADLINE
    )
    assert me.user.email == email
    await api.register()  # registration needs no cache


async def test_a_delete_during_an_outage_is_not_undone_when_redis_returns(proxied: tuple[Api, Proxy]) -> None:
    api, proxy = proxied
    email, token, _ = await _owner_with_code(api)
    for _ in range(3):
        await _lookup(api, email)  # cached in Redis
    proxy.refuse()
    await api.referral.DeleteReferralCode(
        referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(token), timeout=DEADLINE
    )
    await expect_error(_lookup(api, email), grpc.StatusCode.NOT_FOUND)
    proxy.restore()
    await asyncio.sleep(0.6)  # past the breaker's reset time
    for _ in range(20):
        await expect_error(_lookup(api, email), grpc.StatusCode.NOT_FOUND)
        await asyncio.sleep(0.05)


async def test_a_delete_during_an_outage_is_not_undone_for_another_replica(
    stack: Stack, proxied: tuple[Api, Proxy]
) -> None:
    api, proxy = proxied
    other = await start_api(stack)  # talks to Redis directly, not through the proxy
    try:
        email, token, _ = await _owner_with_code(api)
        await _lookup(other, email)  # cached in Redis by the other replica
        proxy.refuse()
        await api.referral.DeleteReferralCode(
            referral_pb2.DeleteReferralCodeRequest(), metadata=bearer(token), timeout=DEADLINE
        )
        proxy.restore()
        # the replica that could not invalidate repairs by bumping the cache epoch
        for _ in range(60):
            try:
                await _lookup(other, email)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the other replica kept serving the deleted code")
        for _ in range(10):
            await expect_error(_lookup(other, email), grpc.StatusCode.NOT_FOUND)
    finally:
        await stop_api(other)


async def test_logout_during_an_outage_still_revokes(proxied: tuple[Api, Proxy]) -> None:
    api, proxy = proxied
    email = api.unique_email()
    await api.register(email)
    tokens = await api.login(email)
    proxy.refuse()
    await api.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(tokens.access_token), timeout=DEADLINE)
    await expect_error(
        api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token)),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )
    proxy.restore()
    await asyncio.sleep(0.6)
    for _ in range(5):
        await expect_error(
            api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token)),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_REVOKED",
        )
        await asyncio.sleep(0.1)


async def test_health_reports_redis_down_and_back(proxied: tuple[Api, Proxy]) -> None:
    api, proxy = proxied
    email, _, _ = await _owner_with_code(api)
    request = health_pb2.HealthCheckRequest(service="referral-service.redis")
    assert (await api.health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
    proxy.refuse()
    for _ in range(5):
        await _lookup(api, email)
    await asyncio.sleep(0.05)
    assert (await api.health.Check(request)).status == health_pb2.HealthCheckResponse.NOT_SERVING
    overall = await api.health.Check(health_pb2.HealthCheckRequest(service=""))
    assert overall.status == health_pb2.HealthCheckResponse.SERVING  # degraded, still serving
    proxy.restore()
    await asyncio.sleep(0.6)
    for _ in range(3):
        await _lookup(api, email)
    await asyncio.sleep(0.05)
    assert (await api.health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING


async def test_the_service_starts_and_serves_with_redis_unreachable(stack: Stack) -> None:
    proxy = await Proxy("127.0.0.1", 9).start()
    proxy.refuse()
    api = await start_api(stack, redis_url=proxy.url)
    try:
        email, _, code = await _owner_with_code(api)
        assert (await _lookup(api, email)).code == code.code
    finally:
        await stop_api(api)
        await proxy.close()


async def test_concurrent_lookups_through_redis_each_get_their_own_answer(api: Api) -> None:
    """Calls made together share Redis round trips (auto-pipelining): every answer must still
    reach the call that asked, including the misses, the fills and the rate-limit steps."""
    owners = [await _owner_with_code(api) for _ in range(8)]
    unknown = [api.unique_email() for _ in range(8)]
    for _round in range(3):  # a cold cache (misses then fills), then warm ones (hits)
        calls = [_lookup(api, email) for email, _, _ in owners for _ in range(6)]
        results = await asyncio.gather(*calls)
        assert [r.code for r in results] == [code.code for _, _, code in owners for _ in range(6)]
        for email in unknown:
            await expect_error(_lookup(api, email), grpc.StatusCode.NOT_FOUND, "REFERRAL_CODE_NOT_FOUND")


async def test_lookups_recover_when_redis_forgets_its_scripts(api: Api) -> None:
    """Redis restarted empty (or SCRIPT FLUSH): the server loads its Lua scripts again, within
    batches of concurrent calls too, and answers as before."""
    import redis.asyncio as aioredis

    assert api.stack.redis_url is not None
    owners = [await _owner_with_code(api) for _ in range(4)]
    assert [(await _lookup(api, e)).code for e, _, _ in owners] == [c.code for _, _, c in owners]
    client = aioredis.Redis.from_url(api.stack.redis_url)
    try:
        await client.script_flush()
    finally:
        await client.aclose()
    results = await asyncio.gather(*(_lookup(api, email) for email, _, _ in owners for _ in range(5)))
    assert [r.code for r in results] == [code.code for _, _, code in owners for _ in range(5)]


def _round_trips(proxy: Proxy) -> list[bytes]:
    """The round trips the server made to Redis since the last call, the health probe's PINGs
    left out (they run on their own schedule)."""
    sent = [data for _, data in proxy.requests if not data.upper().endswith(b"PING\r\n")]
    proxy.requests.clear()
    return sent


async def test_a_cached_lookup_costs_one_redis_round_trip(proxied: tuple[Api, Proxy]) -> None:
    """GetReferralCodeByEmail on a warm cache: its rate limit and its cache read leave in one
    batch (two scripts, one write and one read), counted at a proxy in front of Redis."""
    api, proxy = proxied
    email, _, code = await _owner_with_code(api)
    assert (await _lookup(api, email)).code == code.code  # a miss: fills the cache
    _round_trips(proxy)
    for _ in range(5):
        assert (await _lookup(api, email)).code == code.code
    sent = _round_trips(proxy)
    assert len(sent) == 5, sent
    assert all(data.count(b"EVALSHA") == 2 for data in sent), sent

    # A miss: the same round trip, then the fill.
    unknown = api.unique_email()
    await expect_error(_lookup(api, unknown), grpc.StatusCode.NOT_FOUND, "REFERRAL_CODE_NOT_FOUND")
    sent = _round_trips(proxy)
    assert [data.count(b"EVALSHA") for data in sent] == [2, 1], sent
    # ... and the negative answer is a hit of one round trip from then on.
    await expect_error(_lookup(api, unknown), grpc.StatusCode.NOT_FOUND, "REFERRAL_CODE_NOT_FOUND")
    assert [data.count(b"EVALSHA") for data in _round_trips(proxy)] == [2]
