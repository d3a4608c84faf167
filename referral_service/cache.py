"""Cache and revocation store: Redis when ``REFERRAL_REDIS_URL`` is set, else in-process.

Cache-aside with versioned fills, so a read racing a delete can never put the deleted value
back (the predecessor served a deleted code from its cache 300 times out of 300):

- ``lookup(key)`` returns a hit, or a miss carrying a *stamp* (the key's invalidation version
  and the global epoch, read in the same round trip);
- ``fill(key, stamp, value, ttl)`` stores the value only if no invalidation happened since the
  stamp was taken (checked atomically in Redis by a Lua script);
- ``invalidate(key)`` bumps the key's version and deletes the value, after the database commit.

Plain values (``get``/``set`` with a TTL) serve results that are never invalidated, such as
email verification answers.

Redis is an accelerator, never a dependency: every call has a short socket timeout, and a
circuit breaker stops calling it after a few failures, so an outage costs nothing but cache
hits. If an invalidation cannot reach Redis, this process stops using the cache until it has
bumped the global epoch, which makes every value written before the outage unreadable for every
replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.commands.core import AsyncScript

# Re-exported: CircuitBreaker lived here before it was shared with the HTTP integrations.
from referral_service.ratelimit import GCRA_SCRIPT
from referral_service.resilience import CircuitBreaker as CircuitBreaker

log = logging.getLogger("referral_service.cache")
T = TypeVar("T")

_VERSION_TTL_MS = 24 * 3600 * 1000
#: A queued script call: the script, its keys and arguments, and the caller's future.
_Queued = tuple["AsyncScript", list[Any], list[Any], "asyncio.Future[Any]"]


@dataclass(frozen=True, slots=True)
class Lookup:
    hit: bool
    #: On a hit, the cached bytes (``b""`` is a cached "nothing there").
    value: bytes | None = None
    #: On a miss, what ``fill`` needs; None when the cache must not be filled now.
    stamp: object | None = None


class Cache(Protocol):
    backend: str
    #: True when every replica and worker sees the same store (Redis).
    shared: bool

    async def lookup(self, key: str) -> Lookup: ...
    async def fill(self, key: str, stamp: object, value: bytes, ttl_seconds: float) -> None: ...
    async def invalidate(self, key: str) -> None: ...
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None: ...
    async def revoke(self, keys: Sequence[str], ttl_seconds: float) -> bool: ...
    async def any_revoked(self, keys: Sequence[str]) -> bool | None: ...
    async def seed_revocations(self, entries: Sequence[tuple[str, float]]) -> bool: ...
    async def healthy(self) -> bool: ...
    async def close(self) -> None: ...


# --- in-process ------------------------------------------------------------------------------


class MemoryCache:
    """Process-local cache and revocation store, bounded in size. Correct for one process; with
    several workers and no Redis each worker has its own copy (see README)."""

    backend = "memory"
    shared = False

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._values: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._invalidated: OrderedDict[str, int] = OrderedDict()
        self._revoked: dict[str, float] = {}
        self._plain: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._generation = 0
        self._forgotten = 0  # newest generation evicted from _invalidated: older stamps can't fill
        self._max = max_entries
        self._clock = clock

    async def lookup(self, key: str) -> Lookup:
        entry = self._values.get(key)
        if entry is not None:
            value, expires = entry
            if expires > self._clock():
                return Lookup(hit=True, value=value)
            del self._values[key]
        return Lookup(hit=False, stamp=self._generation)

    async def fill(self, key: str, stamp: object, value: bytes, ttl_seconds: float) -> None:
        assert isinstance(stamp, int)
        if self._max == 0 or ttl_seconds <= 0 or stamp < self._forgotten:
            return
        if self._invalidated.get(key, -1) > stamp:  # invalidated after the stamp was taken
            return
        self._values[key] = (value, self._clock() + ttl_seconds)
        self._values.move_to_end(key)
        while len(self._values) > self._max:
            self._values.popitem(last=False)

    async def invalidate(self, key: str) -> None:
        self._generation += 1
        self._values.pop(key, None)
        self._invalidated[key] = self._generation
        self._invalidated.move_to_end(key)
        while len(self._invalidated) > self._max:
            _, generation = self._invalidated.popitem(last=False)
            self._forgotten = max(self._forgotten, generation)

    async def get(self, key: str) -> bytes | None:
        """A plain value stored with ``set`` (no versioning), or None when absent or expired."""
        entry = self._plain.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires <= self._clock():
            del self._plain[key]
            return None
        return value

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        if ttl_seconds <= 0:
            return
        self._plain[key] = (value, self._clock() + ttl_seconds)
        self._plain.move_to_end(key)
        while len(self._plain) > self._max:
            self._plain.popitem(last=False)

    async def revoke(self, keys: Sequence[str], ttl_seconds: float) -> bool:
        now = self._clock()
        if len(self._revoked) > self._max:
            self._revoked = {k: t for k, t in self._revoked.items() if t > now}
        for key in keys:
            self._revoked[key] = max(self._revoked.get(key, 0.0), now + ttl_seconds)
        return True

    async def any_revoked(self, keys: Sequence[str]) -> bool | None:
        """True when this process knows a key is revoked; otherwise unknown (None): another
        worker or replica may have revoked it, so the caller asks the database."""
        now = self._clock()
        return True if any(self._revoked.get(key, 0.0) > now for key in keys) else None

    async def seed(self, entries: Sequence[tuple[str, float]]) -> bool:
        return await self.seed_revocations(entries)

    async def seed_revocations(self, entries: Sequence[tuple[str, float]]) -> bool:
        for key, ttl in entries:
            await self.revoke([key], ttl)
        return True

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        return None


# --- Redis -----------------------------------------------------------------------------------

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

# KEYS[1] is the sentinel written after the store was seeded from the database: without it
# (Redis restarted empty, or was never seeded) the answer is unknown (-1) and the caller asks
# the database instead.
_ANY_REVOKED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = 0
for i = 2, #KEYS do n = n + redis.call('EXISTS', KEYS[i]) end
return n
"""

_INVALIDATE = """
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""


class AutoPipeline:
    """Script calls made while a batch is on the wire leave together in the next one: under
    load, one write and one read serve many concurrent calls instead of a round trip each
    (what ioredis calls auto-pipelining, and Lettuce does by default). An idle client sends a
    call at once (one loop iteration later, so that calls made together leave together).

    Batches go over one dedicated connection, written and read directly (redis-py's
    connection and its hiredis parser, without the per-command client, pool and pipeline
    layers, which cost more event-loop time than the round trip itself). A connection that
    fails or times out is dropped by redis-py and reopened by the next batch.

    Callers wait on a future; one that gives up (deadline) simply stops waiting. A script the
    server does not know (after a restart or SCRIPT FLUSH) is loaded and the call retried.
    """

    def __init__(self, client: aioredis.Redis, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._queue: list[_Queued] = []
        self._sender: asyncio.Task[None] | None = None
        self._conn: Any = None

    def call(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((script, keys, args, future))
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_all())
        return future

    async def _send_all(self) -> None:
        batch: list[_Queued] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send([item for item in batch if not item[3].done()])
        except BaseException as error:  # cancelled (shutdown): fail every waiting call
            for *_, future in batch + self._queue:
                if not future.done():
                    future.set_exception(ConnectionError(f"redis call not completed: {error!r}"))
            self._queue = []
            raise
        finally:
            self._sender = None

    async def _send(self, batch: list[_Queued]) -> None:
        if not batch:
            return
        from redis.exceptions import NoScriptError, ResponseError

        results: list[Any] = []
        try:
            async with asyncio.timeout(self._timeout):
                if self._conn is None:
                    self._conn = await self._client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
                conn = self._conn
                commands = [
                    ("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args, _ in batch
                ]
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                for _ in batch:
                    try:
                        results.append(await conn.read_response())
                    except ResponseError as error:  # this call's error; the stream is intact
                        results.append(error)
                for index, result in enumerate(results):
                    if isinstance(result, NoScriptError):
                        script, keys, args, _ = batch[index]
                        results[index] = await script(keys=keys, args=args)  # loads it
        except Exception as error:  # the connection failed or timed out: every call failed
            for *_, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.disconnect()
            await self._client.connection_pool.release(conn)


class RedisCache:
    backend = "redis"
    shared = True

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "referral:",
        timeout: float = 0.25,
        breaker_threshold: int = 3,
        breaker_reset_seconds: float = 5.0,
        on_health_change: Callable[[bool], None] | None = None,
    ) -> None:
        # Imported here: a deployment without Redis does not pay for the client (~5 MB per worker).
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._errors: tuple[type[BaseException], ...] = (aioredis.RedisError, OSError, TimeoutError)
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            # Every operation runs under one deadline in _call(); a per-socket timeout would add
            # a wait_for (a task) per write and a timer per read.
            socket_timeout=None,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
            max_connections=64,
        )
        self._prefix = prefix
        self._timeout = timeout
        self.breaker = CircuitBreaker(breaker_threshold, breaker_reset_seconds, self._changed)
        self._on_health_change = on_health_change
        self._lookup = self._redis.register_script(_LOOKUP)
        self._fill = self._redis.register_script(_FILL)
        self._invalidate = self._redis.register_script(_INVALIDATE)
        self._any_revoked = self._redis.register_script(_ANY_REVOKED)
        self._gcra = self._redis.register_script(GCRA_SCRIPT)
        self._batch = AutoPipeline(self._redis, timeout)
        self._sentinel = f"{prefix}rev-seeded"
        self._epoch_key = f"{prefix}epoch"
        #: An invalidation failed: do not use cached values until the epoch has been bumped.
        self._dirty = False
        self._repair: asyncio.Task[None] | None = None

    def _changed(self, up: bool) -> None:
        if self._on_health_change:
            self._on_health_change(up)

    async def _call(self, fn: Callable[[], Awaitable[T]], *, deadline: bool = True) -> T:
        """Run one Redis operation under the breaker and (unless the operation brings its own)
        an overall deadline; raise ``ConnectionError`` when it is not attempted or fails."""
        if not self.breaker.allow():
            raise ConnectionError("redis circuit breaker is open")
        try:
            if deadline:
                async with asyncio.timeout(self._timeout * 2):  # no extra task, unlike wait_for
                    result = await fn()
            else:
                result = await fn()
        except self._errors as error:
            self.breaker.failure(error)
            raise ConnectionError(str(error)) from error
        self.breaker.success()
        return result

    async def _script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """A Lua script call through the auto-pipeline. No timer per call: each batch has its
        own deadline, and a call waits for at most two batches (the one on the wire, its own)."""
        return await self._call(lambda: self._batch.call(script, keys, args), deadline=False)

    def _keys(self, key: str) -> list[str]:
        return [f"{self._prefix}v:{key}", f"{self._prefix}ver:{key}", self._epoch_key]

    async def lookup(self, key: str) -> Lookup:
        if self._dirty:
            return Lookup(hit=False)
        try:
            raw, version, epoch = await self._script(self._lookup, self._keys(key), [])
        except ConnectionError:
            return Lookup(hit=False)
        version = _text(version)
        epoch = _text(epoch)
        if raw:
            head, _, payload = bytes(raw).partition(b"|")
            if head.decode() == f"{epoch}:{version}":
                return Lookup(hit=True, value=payload)
        return Lookup(hit=False, stamp=(version, epoch))

    async def fill(self, key: str, stamp: object, value: bytes, ttl_seconds: float) -> None:
        ttl_ms = int(ttl_seconds * 1000)
        if self._dirty or ttl_ms <= 0 or not isinstance(stamp, tuple):
            return
        version, epoch = stamp
        data = f"{epoch}:{version}|".encode() + value
        try:
            await self._script(self._fill, self._keys(key), [version, epoch, data, ttl_ms])
        except ConnectionError:
            return

    async def invalidate(self, key: str) -> None:
        try:
            await self._script(self._invalidate, self._keys(key)[:2], [_VERSION_TTL_MS])
        except ConnectionError:
            self._mark_dirty()

    def _mark_dirty(self) -> None:
        if not self._dirty:
            log.warning("a cache invalidation could not reach redis; cache bypassed until repaired")
        self._dirty = True
        if self._repair is None or self._repair.done():
            self._repair = asyncio.get_running_loop().create_task(self._repair_loop())

    async def _repair_loop(self) -> None:
        delay = 0.2
        while self._dirty:
            try:
                await self._call(lambda: self._redis.incr(self._epoch_key))
            except ConnectionError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._dirty = False
            log.info("redis cache epoch bumped; cache in use again")

    async def get(self, key: str) -> bytes | None:
        """A plain value stored with ``set``; None when absent or Redis is unreachable."""
        try:
            raw = await self._call(lambda: self._redis.get(f"{self._prefix}kv:{key}"))
        except ConnectionError:
            return None
        if raw is None:
            return None
        return raw if isinstance(raw, bytes) else str(raw).encode()

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        ttl_ms = int(ttl_seconds * 1000)
        if ttl_ms <= 0:
            return
        try:
            await self._call(lambda: self._redis.set(f"{self._prefix}kv:{key}", value, px=ttl_ms))
        except ConnectionError:
            return

    async def revoke(self, keys: Sequence[str], ttl_seconds: float) -> bool:
        ttl_ms = max(int(ttl_seconds * 1000), 1)

        async def run() -> Any:
            async with self._redis.pipeline(transaction=True) as pipe:
                for key in keys:
                    pipe.set(f"{self._prefix}rev:{key}", b"1", px=ttl_ms)
                return await pipe.execute()

        try:
            await self._call(run)
        except ConnectionError:
            return False
        return True

    async def any_revoked(self, keys: Sequence[str]) -> bool | None:
        names = [self._sentinel] + [f"{self._prefix}rev:{key}" for key in keys]
        try:
            count = await self._script(self._any_revoked, names, [])
        except ConnectionError:
            return None
        if int(count) < 0:
            return None
        return bool(count)

    async def seed(self, entries: Sequence[tuple[str, float]]) -> bool:
        return await self.seed_revocations(entries)

    async def seed_revocations(self, entries: Sequence[tuple[str, float]]) -> bool:
        async def run() -> Any:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, ttl in entries:
                    pipe.set(f"{self._prefix}rev:{key}", b"1", px=max(int(ttl * 1000), 1))
                pipe.set(self._sentinel, b"1")
                return await pipe.execute()

        try:
            await self._call(run)
        except ConnectionError:
            return False
        return True

    async def gcra(self, key: str, interval_ms: float, period_ms: float, cost: int) -> list[int] | None:
        """One atomic GCRA step for a rate limit (see ``ratelimit.py``); None when Redis is
        unavailable."""
        try:
            result = await self._script(
                self._gcra, [f"{self._prefix}rl:{key}"], [interval_ms, period_ms, cost]
            )
        except ConnectionError:
            return None
        return [int(x) for x in result]

    async def healthy(self) -> bool:
        try:
            await self._call(self._redis.ping)
        except ConnectionError:
            return False
        return True

    async def close(self) -> None:
        if self._repair is not None:
            self._repair.cancel()
        await self._batch.close()
        await self._redis.aclose()


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
