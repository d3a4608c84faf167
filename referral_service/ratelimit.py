"""Rate limiting with GCRA (the generic cell rate algorithm, a leaky bucket kept as one number).

For a limit of ``L`` events per ``P`` seconds, each event advances the key's *theoretical arrival
time* (TAT) by ``T = P / L``; an event is allowed while ``TAT - now <= P``, so a burst of ``L``
events is allowed, then one per ``T``. Compared with fixed windows there is no double burst at a
window edge; compared with sliding logs it stores one number per key.

- With Redis the check-and-advance is one Lua script (atomic, using Redis' clock), so every worker
  and replica shares each budget exactly.
- Without Redis, or while Redis is down (its breaker open, a call failing), the same algorithm runs
  in the process (``MemoryRates``). Policy: **fail open to per-process limits**. Limits stay in
  force during an outage, but each process counts on its own, so the effective limit is up to
  ``L x processes`` for that time; a Redis outage never turns into refused logins.
- ``release`` gives one event back (used for limits that count only failures: a successful login
  returns its token, so a concurrent burst can never exceed the limit).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("referral_service.ratelimit")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    #: Seconds until one more event would be allowed (0 when allowed).
    retry_after: float
    #: Events still allowed right now after this one.
    remaining: int


class RateStore(Protocol):
    async def acquire(self, key: str, limit: int, period: float) -> Decision | None:
        """Take one event; None when the store cannot answer (fall back)."""
        ...

    async def release(self, key: str, limit: int, period: float) -> bool:
        """Give one event back; False when the store cannot answer."""
        ...


class MemoryRates:
    """GCRA in one process, bounded in size (least recently used keys are dropped; a dropped key
    has its full budget again, which only errs towards allowing)."""

    def __init__(self, max_keys: int = 200_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._tat: OrderedDict[str, float] = OrderedDict()
        self._max = max_keys
        self._clock = clock

    async def acquire(self, key: str, limit: int, period: float) -> Decision:
        now = self._clock()
        interval = period / limit
        tat = max(self._tat.get(key, now), now)
        new = tat + interval
        if new - now > period:
            return Decision(False, new - period - now, 0)
        self._tat[key] = new
        self._tat.move_to_end(key)
        while len(self._tat) > self._max:
            self._tat.popitem(last=False)
        return Decision(True, 0.0, int((period - (new - now)) / interval))

    async def release(self, key: str, limit: int, period: float) -> bool:
        now = self._clock()
        tat = self._tat.get(key)
        if tat is not None:
            new = tat - period / limit
            if new <= now:
                del self._tat[key]
            else:
                self._tat[key] = new
        return True


# KEYS[1] = the key's TAT (milliseconds, Redis' clock); ARGV = interval ms, period ms, cost (1 to
# take, -1 to give back). Returns {allowed, retry_after_ms, remaining}.
GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new = tat + cost * interval
if cost < 0 then
  if new <= now then redis.call('DEL', KEYS[1])
  else redis.call('SET', KEYS[1], string.format('%.3f', new), 'PX', math.ceil(new - now)) end
  return {1, 0, 0}
end
if new - now > period then
  return {0, math.ceil(new - period - now), 0}
end
redis.call('SET', KEYS[1], string.format('%.3f', new), 'PX', math.ceil(new - now))
return {1, 0, math.floor((period - (new - now)) / interval)}
"""


class GcraRunner(Protocol):
    """What the Redis cache offers: run the GCRA script, None when Redis is unavailable."""

    async def gcra(self, key: str, interval_ms: float, period_ms: float, cost: int) -> list[int] | None: ...


class RedisRates:
    def __init__(self, runner: GcraRunner) -> None:
        self._runner = runner

    async def acquire(self, key: str, limit: int, period: float) -> Decision | None:
        period_ms = period * 1000
        result = await self._runner.gcra(key, period_ms / limit, period_ms, 1)
        if result is None:
            return None
        allowed, retry_ms, remaining = (int(x) for x in result)
        return Decision(bool(allowed), retry_ms / 1000, remaining)

    async def release(self, key: str, limit: int, period: float) -> bool:
        period_ms = period * 1000
        return await self._runner.gcra(key, period_ms / limit, period_ms, -1) is not None


class RateLimiter:
    """A shared store (Redis) with the in-process store as fallback."""

    def __init__(self, shared: RateStore | None = None) -> None:
        self._shared = shared
        self._local = MemoryRates()
        self._fell_back = False

    @property
    def backend(self) -> str:
        return "redis" if self._shared is not None else "memory"

    async def acquire(self, key: str, limit: int, period: float) -> Decision:
        if self._shared is not None:
            decision = await self._shared.acquire(key, limit, period)
            if decision is not None:
                if self._fell_back:
                    self._fell_back = False
                    log.info("rate limits are shared through redis again")
                return decision
            if not self._fell_back:
                self._fell_back = True
                log.warning("redis unavailable: rate limits are counted per process until it returns")
        return await self._local.acquire(key, limit, period)

    async def release(self, key: str, limit: int, period: float) -> None:
        if self._shared is not None and await self._shared.release(key, limit, period):
            return
        await self._local.release(key, limit, period)


def retry_seconds(value: float) -> int:
    """Whole seconds for messages and metadata (at least 1)."""
    return max(1, math.ceil(value))
