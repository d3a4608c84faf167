"""One contract for the fast-store ports (``VersionedCache``, ``KeyValueCache``,
``RevocationCache``, ``RateLimiter`` in referral_service/domain/ports.py), run against the
in-process twins and real Redis.

Time: the memory twins take a clock, which :meth:`Stores.elapse` moves. In Redis, ``elapse``
shortens the remaining lifetime of every key of the test (a key due by then is deleted), which
is what the passage of time does to them; so lifetimes are tested without sleeping. Rate-limit
tests do not move time: their periods are an hour long, so the few milliseconds a test takes
never matter. Each Redis test uses keys under its own prefix, deleted at the end.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from referral_service.domain.ports import (
    CacheLookup,
    KeyValueCache,
    RateDecision,
    RateLimiter,
    RevocationCache,
    VersionedCache,
)
from referral_service.memory.cache import MemoryCache, NoCache
from referral_service.memory.limiter import MemoryRateLimiter
from referral_service.memory.revocations import MemoryRevocations
from referral_service.redis.cache import RedisCache
from referral_service.redis.limiter import RedisRateLimiter
from referral_service.redis.revocations import RedisRevocations
from referral_service.redis.transport import RedisTransport
from tests.conftest import REDIS_URL, _need
from tests.proxy import Proxy

#: Generous: a loaded 2-core machine must not turn a slow answer into a cache miss.
TIMEOUT = 2.0
#: Rate limits of the tests: 3 an hour, one more every 20 minutes.
LIMIT, PERIOD = 3, 3600.0
INTERVAL = PERIOD / LIMIT


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RedisMustAnswer:
    """The Redis limiter's fallback in these tests: the contract is Redis' answer, so a
    fallback would hide a failure."""

    async def acquire(self, key: str, limit: int, period: float) -> RateDecision:
        raise AssertionError("redis did not answer a rate-limit step")

    async def release(self, key: str, limit: int, period: float) -> None:
        raise AssertionError("redis did not answer a rate-limit step")


@dataclass
class Stores:
    name: str
    cache: VersionedCache
    values: KeyValueCache
    revocations: RevocationCache
    limiter: RateLimiter
    #: Let ``seconds`` pass for every lifetime.
    elapse: Callable[[float], Awaitable[None]]
    #: The store loses everything it holds (a Redis restart, a new process).
    restart: Callable[[], Awaitable[None]]


async def _delete_prefix(client: aioredis.Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
    if keys:
        await client.delete(*keys)


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest, redis_available: bool) -> AsyncIterator[Stores]:
    if request.param == "memory":
        clock = Clock()
        cache = MemoryCache(clock=clock)

        async def elapse(seconds: float) -> None:
            clock.now += seconds

        async def restart() -> None:
            made.revocations = MemoryRevocations(clock=clock)

        made = Stores(
            "memory",
            cache,
            cache,
            MemoryRevocations(clock=clock),
            MemoryRateLimiter(clock=clock),
            elapse,
            restart,
        )
        yield made
        return

    _need("Redis", redis_available)
    prefix = f"test:contract:{uuid.uuid4().hex[:10]}:"
    transport = RedisTransport(REDIS_URL, prefix=prefix, timeout=TIMEOUT)
    admin = aioredis.Redis.from_url(REDIS_URL)
    redis_cache = RedisCache(transport)

    async def elapse_redis(seconds: float) -> None:
        elapsed_ms = int(seconds * 1000)
        async for key in admin.scan_iter(match=f"{prefix}*", count=500):
            left = await admin.pttl(key)
            if left < 0:  # no lifetime (or already gone)
                continue
            if left <= elapsed_ms:
                await admin.delete(key)
            else:
                await admin.pexpire(key, left - elapsed_ms)

    async def restart_redis() -> None:
        await _delete_prefix(admin, prefix)

    try:
        yield Stores(
            "redis",
            redis_cache,
            redis_cache,
            RedisRevocations(transport),
            RedisRateLimiter(transport, fallback=RedisMustAnswer()),
            elapse_redis,
            restart_redis,
        )
    finally:
        await redis_cache.close()
        await transport.close()
        try:
            await _delete_prefix(admin, prefix)
        finally:
            await admin.aclose()


# --- versioned cache ---------------------------------------------------------------------------


async def _miss(cache: VersionedCache, key: str) -> object:
    found = await cache.lookup(key)
    assert found == CacheLookup(hit=False, stamp=found.stamp)
    assert found.stamp is not None
    return found.stamp


async def test_a_miss_carries_a_stamp_and_a_fill_makes_a_hit(stores: Stores) -> None:
    stamp = await _miss(stores.cache, "a")
    await stores.cache.fill("a", stamp, b"value of a", 60)
    assert await stores.cache.lookup("a") == CacheLookup(hit=True, value=b"value of a")
    await _miss(stores.cache, "b")  # keys are separate


async def test_a_fill_is_refused_after_an_invalidation(stores: Stores) -> None:
    """A read that started before an invalidation must not put the old value back."""
    stale = await _miss(stores.cache, "a")
    await stores.cache.invalidate("a")  # the data changed and was committed meanwhile
    await stores.cache.fill("a", stale, b"old", 60)
    fresh = await _miss(stores.cache, "a")
    await stores.cache.fill("a", fresh, b"new", 60)  # a read after the invalidation fills
    assert await stores.cache.lookup("a") == CacheLookup(hit=True, value=b"new")
    await stores.cache.fill("a", stale, b"old", 60)  # still refused later on
    assert await stores.cache.lookup("a") == CacheLookup(hit=True, value=b"new")


async def test_an_invalidation_of_another_key_does_not_refuse_a_fill(stores: Stores) -> None:
    stamp = await _miss(stores.cache, "a")
    await stores.cache.invalidate("b")
    await stores.cache.fill("a", stamp, b"value of a", 60)
    assert await stores.cache.lookup("a") == CacheLookup(hit=True, value=b"value of a")


async def test_an_invalidation_drops_the_cached_value(stores: Stores) -> None:
    await stores.cache.fill("a", await _miss(stores.cache, "a"), b"value of a", 60)
    await stores.cache.invalidate("a")
    await _miss(stores.cache, "a")
    await stores.cache.invalidate("never-cached")  # harmless


async def test_a_negative_value_is_a_hit_with_empty_bytes(stores: Stores) -> None:
    await stores.cache.fill("nobody", await _miss(stores.cache, "nobody"), b"", 60)
    assert await stores.cache.lookup("nobody") == CacheLookup(hit=True, value=b"")


async def test_a_cached_value_lives_for_its_ttl(stores: Stores) -> None:
    await stores.cache.fill("a", await _miss(stores.cache, "a"), b"short", 60)
    await stores.cache.fill("b", await _miss(stores.cache, "b"), b"long", 600)
    await stores.elapse(50)
    assert await stores.cache.lookup("a") == CacheLookup(hit=True, value=b"short")
    await stores.elapse(11)
    await _miss(stores.cache, "a")
    assert await stores.cache.lookup("b") == CacheLookup(hit=True, value=b"long")


@pytest.mark.parametrize("ttl", [0, -5])
async def test_a_fill_without_a_lifetime_is_not_stored(stores: Stores, ttl: float) -> None:
    await stores.cache.fill("a", await _miss(stores.cache, "a"), b"value", ttl)
    await _miss(stores.cache, "a")


# --- key-value ----------------------------------------------------------------------------------


async def test_plain_values_are_stored_and_replaced(stores: Stores) -> None:
    assert await stores.values.get("k") is None
    await stores.values.set("k", b"one", 60)
    assert await stores.values.get("k") == b"one"
    await stores.values.set("k", b"two", 60)
    assert await stores.values.get("k") == b"two"
    assert await stores.values.get("other") is None
    await _miss(stores.cache, "k")  # a plain value is not a versioned one


async def test_a_plain_value_lives_for_its_ttl(stores: Stores) -> None:
    await stores.values.set("k", b"short", 60)
    await stores.values.set("l", b"long", 600)
    await stores.elapse(50)
    assert await stores.values.get("k") == b"short"
    await stores.elapse(11)
    assert await stores.values.get("k") is None
    assert await stores.values.get("l") == b"long"


@pytest.mark.parametrize("ttl", [0, -5])
async def test_a_plain_value_without_a_lifetime_is_not_stored(stores: Stores, ttl: float) -> None:
    await stores.values.set("k", b"value", ttl)
    assert await stores.values.get("k") is None


# --- revocations --------------------------------------------------------------------------------


async def test_before_seeding_the_store_never_says_not_revoked(stores: Stores) -> None:
    """An unseeded store (Redis empty after a restart) cannot tell what it does not hold."""
    assert await stores.revocations.any_revoked(["jti:unknown"]) is None
    assert await stores.revocations.revoke(["jti:a"], 60) is True
    assert await stores.revocations.any_revoked(["jti:a"]) in (True, None)
    assert await stores.revocations.any_revoked(["jti:unknown"]) is None


async def test_a_seeded_store_answers(stores: Stores) -> None:
    assert await stores.revocations.seed([("jti:a", 60), ("sid:s", 60)]) is True
    assert await stores.revocations.any_revoked(["jti:a"]) is True
    assert await stores.revocations.any_revoked(["jti:other", "sid:s"]) is True
    # "not revoked" only from a store every worker shares; a process-local one cannot know
    unknown = await stores.revocations.any_revoked(["jti:other", "sid:other"])
    assert unknown is (False if stores.revocations.shared else None)
    assert await stores.revocations.revoke(["jti:b", "sid:t"], 60) is True
    assert await stores.revocations.any_revoked(["jti:b"]) is True
    assert await stores.revocations.any_revoked(["sid:t"]) is True


async def test_an_empty_seed_marks_the_store_seeded(stores: Stores) -> None:
    assert await stores.revocations.seed([]) is True
    assert await stores.revocations.any_revoked(["jti:x"]) is (False if stores.revocations.shared else None)


async def test_a_revocation_lives_for_its_ttl(stores: Stores) -> None:
    await stores.revocations.seed([("jti:seeded", 30)])
    await stores.revocations.revoke(["jti:a"], 60)
    await stores.revocations.revoke(["jti:long"], 600)
    await stores.elapse(50)
    assert await stores.revocations.any_revoked(["jti:a"]) is True
    assert await stores.revocations.any_revoked(["jti:seeded"]) is not True
    await stores.elapse(11)
    assert await stores.revocations.any_revoked(["jti:a"]) is not True
    assert await stores.revocations.any_revoked(["jti:long"]) is True


async def test_a_store_that_lost_its_data_cannot_tell_until_seeded_again(stores: Stores) -> None:
    await stores.revocations.seed([("jti:a", 60)])
    await stores.restart()
    assert await stores.revocations.any_revoked(["jti:a"]) is None
    assert await stores.revocations.any_revoked(["jti:b"]) is None
    await stores.revocations.seed([("jti:a", 60)])
    assert await stores.revocations.any_revoked(["jti:a"]) is True


# --- rate limits --------------------------------------------------------------------------------


async def test_a_burst_of_the_limit_is_allowed_then_refused(stores: Stores) -> None:
    decisions = [await stores.limiter.acquire("k", LIMIT, PERIOD) for _ in range(LIMIT)]
    assert [(d.allowed, d.retry_after, d.remaining) for d in decisions] == [
        (True, 0, 2),
        (True, 0, 1),
        (True, 0, 0),
    ]
    refused = await stores.limiter.acquire("k", LIMIT, PERIOD)
    assert not refused.allowed
    assert refused.remaining == 0
    # one more event in one interval (minus the moments this test took)
    assert INTERVAL - 60 < refused.retry_after <= INTERVAL
    assert not (await stores.limiter.acquire("k", LIMIT, PERIOD)).allowed  # a refusal takes nothing


async def test_release_gives_one_event_back(stores: Stores) -> None:
    for _ in range(LIMIT):
        assert (await stores.limiter.acquire("k", LIMIT, PERIOD)).allowed
    await stores.limiter.release("k", LIMIT, PERIOD)
    assert (await stores.limiter.acquire("k", LIMIT, PERIOD)).allowed
    assert not (await stores.limiter.acquire("k", LIMIT, PERIOD)).allowed


async def test_a_release_never_adds_to_a_full_budget(stores: Stores) -> None:
    await stores.limiter.release("k", LIMIT, PERIOD)
    allowed = [(await stores.limiter.acquire("k", LIMIT, PERIOD)).allowed for _ in range(LIMIT + 1)]
    assert allowed == [True] * LIMIT + [False]


async def test_keys_have_their_own_budgets(stores: Stores) -> None:
    for _ in range(LIMIT):
        await stores.limiter.acquire("k", LIMIT, PERIOD)
    assert not (await stores.limiter.acquire("k", LIMIT, PERIOD)).allowed
    assert (await stores.limiter.acquire("other", LIMIT, PERIOD)).remaining == LIMIT - 1


async def test_concurrent_acquisitions_never_exceed_the_limit(stores: Stores) -> None:
    decisions = await asyncio.gather(*(stores.limiter.acquire("k", 5, PERIOD) for _ in range(20)))
    assert sum(d.allowed for d in decisions) == 5


# --- the twins' own ------------------------------------------------------------------------------


async def test_the_memory_limiter_allows_one_more_after_retry_after() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(clock=clock)
    for _ in range(LIMIT):
        await limiter.acquire("k", LIMIT, PERIOD)
    refused = await limiter.acquire("k", LIMIT, PERIOD)
    assert refused.retry_after == INTERVAL
    clock.now += refused.retry_after - 1
    assert not (await limiter.acquire("k", LIMIT, PERIOD)).allowed
    clock.now += 1
    assert await limiter.acquire("k", LIMIT, PERIOD) == RateDecision(True, 0.0, 0)


async def test_the_non_storing_cache_never_hits() -> None:
    """For several workers without Redis: a miss carries no stamp, so nothing is filled."""
    cache = NoCache()
    assert await cache.lookup("a") == CacheLookup(hit=False)
    await cache.fill("a", 0, b"value", 60)
    await cache.invalidate("a")
    assert await cache.lookup("a") == CacheLookup(hit=False)
    await cache.set("k", b"value", 60)
    assert await cache.get("k") is None


# --- Redis unreachable ----------------------------------------------------------------------------


@dataclass
class Proxied:
    proxy: Proxy
    transport: RedisTransport
    cache: RedisCache
    prefix: str


@pytest.fixture
async def proxied(redis_available: bool) -> AsyncIterator[Proxied]:
    """Redis behind a proxy the test can cut."""
    _need("Redis", redis_available)
    target = urlsplit(REDIS_URL)
    proxy = await Proxy(target.hostname or "127.0.0.1", target.port or 6379).start()
    prefix = f"test:contract:{uuid.uuid4().hex[:10]}:"
    # Short deadline (a hanging Redis costs at most this per call until the breaker opens);
    # a short breaker reset so that a repair is tried soon after Redis is back.
    transport = RedisTransport(proxy.url, prefix=prefix, timeout=0.2, breaker_reset_seconds=0.2)
    cache = RedisCache(transport)
    try:
        yield Proxied(proxy, transport, cache, prefix)
    finally:
        await cache.close()
        await transport.close()
        await proxy.close()
        admin = aioredis.Redis.from_url(REDIS_URL)
        try:
            await _delete_prefix(admin, prefix)
        finally:
            await admin.aclose()


@pytest.mark.parametrize("failure", ["refuse", "hang"])
async def test_an_unreachable_redis_never_raises(proxied: Proxied, failure: str) -> None:
    """Every port answers as the ports say: misses, None, False; limits counted per process."""
    transport, cache = proxied.transport, proxied.cache
    revocations = RedisRevocations(transport)
    limiter = RedisRateLimiter(transport, fallback=MemoryRateLimiter())
    assert await transport.ping()
    getattr(proxied.proxy, failure)()
    for _ in range(2):  # while the breaker counts failures, and once it is open
        assert await cache.lookup("a") == CacheLookup(hit=False)
        await cache.fill("a", ("0", "0"), b"value", 60)
        await cache.invalidate("a")
        assert await cache.get("k") is None
        await cache.set("k", b"value", 60)
        assert await revocations.revoke(["jti:a"], 60) is False
        assert await revocations.any_revoked(["jti:a"]) is None
        assert await revocations.seed([("jti:a", 60)]) is False
        assert not await transport.ping()
    assert not transport.breaker.closed
    allowed = [(await limiter.acquire("k", LIMIT, PERIOD)).allowed for _ in range(LIMIT + 1)]
    assert allowed == [True] * LIMIT + [False]  # still limited, per process


async def _eventually(check: Callable[[], Awaitable[bool]], seconds: float = 20.0) -> None:
    """Wait for a background repair (bounded; the outcome, not the time, is asserted)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await check():
        assert loop.time() < deadline, "the cache was not repaired"
        await asyncio.sleep(0.05)


async def test_a_failed_invalidation_bypasses_the_cache_until_no_replica_can_serve_the_old_value(
    proxied: Proxied,
) -> None:
    cache = proxied.cache
    other_transport = RedisTransport(REDIS_URL, prefix=proxied.prefix, timeout=TIMEOUT)
    other = RedisCache(other_transport)  # another replica, with a working connection
    try:
        await cache.fill("a", await _miss(cache, "a"), b"old", 60)
        assert await other.lookup("a") == CacheLookup(hit=True, value=b"old")
        proxied.proxy.refuse()
        await cache.invalidate("a")  # committed in the database, but Redis was not told
        assert await cache.lookup("a") == CacheLookup(hit=False)  # bypassed, nothing to fill
        proxied.proxy.restore()

        async def repaired() -> bool:
            found = await cache.lookup("a")
            assert found.value != b"old"
            return found.stamp is not None

        await _eventually(repaired)
        # the epoch was bumped: no replica serves what was cached before the outage
        stamp = await _miss(other, "a")
        await other.fill("a", stamp, b"new", 60)
        assert await cache.lookup("a") == CacheLookup(hit=True, value=b"new")
    finally:
        await other.close()
        await other_transport.close()
