"""The revocation store in Redis: the fast copy of the revocation records, shared by every
worker and replica (the database keeps the record).

Redis keeps nothing on disk: after a restart it is empty, and an empty store must not answer
"not revoked". So ``seed`` copies every live revocation in and then writes a sentinel; without
the sentinel (Redis restarted, or never seeded) ``any_revoked`` answers None (cannot tell) and
the caller asks the database.

Keys, under the transport's prefix: ``rev:<key>`` (a revoked key, until it expires) and
``rev-seeded`` (the sentinel, no expiry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from referral_service.redis.transport import RedisTransport, RedisUnavailable

# KEYS[1] is the sentinel: without it the answer is unknown (-1).
_ANY_REVOKED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = 0
for i = 2, #KEYS do n = n + redis.call('EXISTS', KEYS[i]) end
return n
"""


class RedisRevocations:
    shared = True

    def __init__(self, transport: RedisTransport) -> None:
        self._redis = transport
        self._key_prefix = f"{transport.prefix}rev:"
        self._sentinel = f"{transport.prefix}rev-seeded"
        self._any_revoked = transport.script(_ANY_REVOKED, "revocations.check")

    async def revoke(self, keys: Sequence[str], ttl_seconds: float) -> bool:
        return await self._mark([(key, ttl_seconds) for key in keys], seeded=False)

    async def any_revoked(self, keys: Sequence[str]) -> bool | None:
        names = [self._sentinel, *(f"{self._key_prefix}{key}" for key in keys)]
        try:
            count = await self._redis.run_script(self._any_revoked, names, [])
        except RedisUnavailable:
            return None
        if int(count) < 0:
            return None
        return bool(count)

    async def seed(self, entries: Sequence[tuple[str, float]]) -> bool:
        return await self._mark(entries, seeded=True)

    async def _mark(self, entries: Sequence[tuple[str, float]], *, seeded: bool) -> bool:
        """Mark each key revoked for its seconds; with ``seeded``, also the sentinel that says
        the store holds every live revocation. False when Redis did not take it."""

        async def run(client: aioredis.Redis) -> Any:
            # A revocation is all or nothing (MULTI); a seed is only complete with its sentinel.
            async with client.pipeline(transaction=not seeded) as pipe:
                for key, ttl in entries:
                    pipe.set(f"{self._key_prefix}{key}", b"1", px=max(int(ttl * 1000), 1))
                if seeded:
                    pipe.set(self._sentinel, b"1")
                return await pipe.execute()

        try:
            await self._redis.execute(run)
        except RedisUnavailable:
            return False
        return True
