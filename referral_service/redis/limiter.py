"""Rate limits shared by every worker and replica: GCRA in one Lua script (atomic, on Redis'
clock), with an in-process limiter as fallback.

GCRA (the generic cell rate algorithm, a leaky bucket kept as one number): for a limit of ``L``
events per ``P`` seconds, each event advances the key's *theoretical arrival time* (TAT) by
``T = P / L``; an event is allowed while ``TAT - now <= P``, so a burst of ``L`` events is
allowed, then one per ``T``. No double burst at a window edge, one number per key.

Policy while Redis cannot answer (breaker open, a call failing): **fail open to per-process
limits**. Limits stay in force, but each process counts on its own, so the effective limit is
up to ``L x processes`` for that time; a Redis outage never turns into refused logins. The
switch is logged once each way.

Keys, under the transport's prefix: ``rl:<key>`` (the key's TAT in milliseconds).
"""

from __future__ import annotations

import logging

from referral_service.domain.ports import RateDecision, RateLimiter
from referral_service.redis.transport import RedisTransport, RedisUnavailable

log = logging.getLogger("referral_service.redis.limiter")

# KEYS[1] = the key's TAT (milliseconds, Redis' clock); ARGV = interval ms, period ms, cost (1 to
# take, -1 to give back). Returns {allowed, retry_after_ms, remaining}.
_GCRA = """
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


class RedisRateLimiter:
    """GCRA in Redis; ``fallback`` (an in-process limiter) counts while Redis cannot answer."""

    def __init__(self, transport: RedisTransport, fallback: RateLimiter) -> None:
        self._redis = transport
        self._key_prefix = f"{transport.prefix}rl:"
        self._gcra = transport.script(_GCRA, "rate_limit")
        self._fallback = fallback
        self._fell_back = False

    async def _step(self, key: str, limit: int, period: float, cost: int) -> list[int] | None:
        period_ms = period * 1000
        try:
            result = await self._redis.run_script(
                self._gcra, [f"{self._key_prefix}{key}"], [period_ms / limit, period_ms, cost]
            )
        except RedisUnavailable:
            if not self._fell_back:
                self._fell_back = True
                log.warning("redis unavailable: rate limits are counted per process until it returns")
            return None
        if self._fell_back:
            self._fell_back = False
            log.info("rate limits are shared through redis again")
        return [int(x) for x in result]

    async def acquire(self, key: str, limit: int, period: float) -> RateDecision:
        result = await self._step(key, limit, period, 1)
        if result is None:
            return await self._fallback.acquire(key, limit, period)
        allowed, retry_ms, remaining = result
        return RateDecision(bool(allowed), retry_ms / 1000, remaining)

    async def release(self, key: str, limit: int, period: float) -> None:
        if await self._step(key, limit, period, -1) is None:
            await self._fallback.release(key, limit, period)
