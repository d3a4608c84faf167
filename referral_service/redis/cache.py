"""Cache-aside with versioned fills, and plain values with a lifetime, in Redis.

A read racing an invalidation can never put the invalidated value back (the predecessor
served a deleted code from its cache 300 times out of 300):

- ``lookup(key)`` returns a hit, or a miss carrying a *stamp* (the key's invalidation version
  and the global epoch, read in the same round trip);
- ``fill(key, stamp, value, ttl)`` stores the value only if no invalidation happened since the
  stamp was taken (checked atomically by a Lua script);
- ``invalidate(key)`` bumps the key's version and deletes the value, after the database commit.

If an invalidation cannot reach Redis, this process stops using the cache until it has bumped
the global epoch, which makes every value written before the outage unreadable for every
replica (a cached value carries the epoch and version it was filled under).

A look-up can be *started early* (``prefetch(key)``): the rate-limit stage starts the
look-up of ``GetReferralCodeByEmail`` before taking its rate-limit event, so that both
scripts leave in the same batch of the auto-pipeline (one round trip per call instead of two).
The started look-up is remembered for the current task (a context variable) and the next
``lookup(key)`` in that task uses its answer. It is an ordinary look-up taken a moment earlier,
within the same call: its stamp guards the fill as any other, and an ``invalidate(key)`` in the
task forgets it.

Plain values (``get``/``set``) serve answers that are never invalidated, such as email
verification results.

Keys, under the transport's prefix: ``v:<key>`` (a value, ``<epoch>:<version>|<bytes>``),
``ver:<key>`` (its invalidation version), ``epoch`` (the global epoch), ``kv:<key>`` (a plain
value).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

from redis.exceptions import RedisError

from referral_service.domain.backoff import backoff_delay
from referral_service.domain.ports import CacheLookup
from referral_service.redis.transport import RedisTransport, RedisUnavailable

log = logging.getLogger("referral_service.redis.cache")

#: How long an invalidation version outlives the last invalidation of its key (longer than any
#: value's lifetime, so that a stamp taken before it can never match again).
_VERSION_TTL_MS = 24 * 3600 * 1000

#: Look-ups started early in this task (``prefetch``), by key, waiting for their ``lookup``.
_STARTED: contextvars.ContextVar[dict[str, asyncio.Future[Any]] | None] = contextvars.ContextVar(
    "referral_cache_prefetched", default=None
)

_LOOKUP = """
local v = redis.call('GET', KEYS[1])
local ver = redis.call('GET', KEYS[2]) or '0'
local ep = redis.call('GET', KEYS[3]) or '0'
return {v or false, ver, ep}
"""

_FILL = """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
"""

_INVALIDATE = """
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""


class RedisCache:
    """The versioned cache (``VersionedCache``) and the plain values (``KeyValueCache``)."""

    def __init__(self, transport: RedisTransport) -> None:
        self._redis = transport
        prefix = transport.prefix
        self._value_prefix = f"{prefix}v:"
        self._version_prefix = f"{prefix}ver:"
        self._epoch_key = f"{prefix}epoch"
        self._plain_prefix = f"{prefix}kv:"
        self._lookup = transport.script(_LOOKUP, "cache.lookup")
        self._fill = transport.script(_FILL, "cache.fill")
        self._invalidate = transport.script(_INVALIDATE, "cache.invalidate")
        #: An invalidation failed: do not use cached values until the epoch has been bumped.
        self._dirty = False
        self._repair: asyncio.Task[None] | None = None

    def _keys(self, key: str) -> list[str]:
        return [f"{self._value_prefix}{key}", f"{self._version_prefix}{key}", self._epoch_key]

    # --- versioned ---------------------------------------------------------------------------

    def prefetch(self, key: str) -> None:
        """Start the look-up of ``key`` now (it joins the next batch); the next ``lookup(key)``
        in this task uses its answer. Nothing is started while the cache is bypassed or the
        breaker is open."""
        if self._dirty:
            return
        future = self._redis.start_script(self._lookup, self._keys(key), [])
        if future is None:
            return
        started = _STARTED.get()
        if started is None:
            started = {}
            _STARTED.set(started)
        started[key] = future

    async def lookup(self, key: str) -> CacheLookup:
        started = _STARTED.get()
        future = started.pop(key, None) if started else None
        if self._dirty:
            return CacheLookup(hit=False)
        try:
            if future is not None:
                try:
                    raw, version, epoch = await future
                except (RedisError, OSError, TimeoutError) as error:
                    raise RedisUnavailable(str(error)) from error
            else:
                raw, version, epoch = await self._redis.run_script(self._lookup, self._keys(key), [])
        except RedisUnavailable:
            return CacheLookup(hit=False)
        version = _text(version)
        epoch = _text(epoch)
        if raw:
            head, _, payload = bytes(raw).partition(b"|")
            if head.decode() == f"{epoch}:{version}":
                return CacheLookup(hit=True, value=payload)
        return CacheLookup(hit=False, stamp=(version, epoch))

    async def fill(self, key: str, stamp: object, value: bytes, ttl_seconds: float) -> None:
        ttl_ms = int(ttl_seconds * 1000)
        if self._dirty or ttl_ms <= 0 or not isinstance(stamp, tuple):
            return
        version, epoch = stamp
        data = f"{epoch}:{version}|".encode() + value
        try:
            await self._redis.run_script(self._fill, self._keys(key), [version, epoch, data, ttl_ms])
        except RedisUnavailable:
            return

    async def invalidate(self, key: str) -> None:
        started = _STARTED.get()
        if started:
            started.pop(key, None)
        try:
            await self._redis.run_script(self._invalidate, self._keys(key)[:2], [_VERSION_TTL_MS])
        except RedisUnavailable:
            self._mark_dirty()

    def _mark_dirty(self) -> None:
        if not self._dirty:
            log.warning("a cache invalidation could not reach redis; cache bypassed until repaired")
        self._dirty = True
        if self._repair is None or self._repair.done():
            self._repair = asyncio.get_running_loop().create_task(self._repair_epoch())

    async def _repair_epoch(self) -> None:
        attempt = 0
        while self._dirty:
            try:
                await self._redis.execute(lambda client: client.incr(self._epoch_key))
            except RedisUnavailable:
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt, 0.2, 5.0))
                continue
            self._dirty = False
            log.info("redis cache epoch bumped; cache in use again")

    # --- plain values ------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        name = f"{self._plain_prefix}{key}"
        try:
            raw = await self._redis.execute(lambda client: client.get(name))
        except RedisUnavailable:
            return None
        if raw is None:
            return None
        return raw if isinstance(raw, bytes) else str(raw).encode()

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        ttl_ms = int(ttl_seconds * 1000)
        if ttl_ms <= 0:
            return
        name = f"{self._plain_prefix}{key}"
        try:
            await self._redis.execute(lambda client: client.set(name, value, px=ttl_ms))
        except RedisUnavailable:
            return

    async def close(self) -> None:
        """Stop repairing (the transport is closed by its owner)."""
        if self._repair is not None:
            self._repair.cancel()


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
