"""Revoked access tokens (``jti:<id>``) and sessions (``sid:<id>``).

The database is the record (it survives restarts of Redis, which keeps nothing on disk).
With Redis, Redis answers the per-call check; when it cannot (Redis down, or restarted empty and
not yet re-seeded) the check asks the database, and Redis is re-seeded from the database in the
background. Without Redis, the in-process store only short-cuts tokens this process revoked;
every other check asks the database (one primary-key look-up), because another worker or
replica may have revoked the token. A revoked token is never accepted because of a cache outage
or a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime

from referral_service.domain.clock import utcnow
from referral_service.domain.ports import RevocationCache
from referral_service.storage import repositories as repo
from referral_service.storage.db import Database

log = logging.getLogger("referral_service.revocations")


class Revocations:
    def __init__(self, db: Database, cache: RevocationCache) -> None:
        self._db = db
        self._cache = cache
        #: A revocation could not be written to Redis: checks use the database until a re-seed
        #: has copied every live revocation back into Redis.
        self._stale = False
        self._resync_task: asyncio.Task[None] | None = None

    async def publish(self, entries: Sequence[tuple[str, datetime]], now: datetime) -> None:
        """After the database commit: tell the fast store."""
        for key, expire in entries:
            ttl = (expire - now).total_seconds()
            if ttl > 0 and not await self._cache.revoke([key], ttl) and self._cache.shared:
                self._stale = True
                self._schedule_resync()

    async def is_revoked(self, keys: Sequence[str], now: datetime) -> bool:
        if not self._stale:
            answer = await self._cache.any_revoked(keys)
            if answer is not None:
                return answer
            if self._cache.shared:
                self._schedule_resync()
        async with self._db.reader() as conn:
            return await repo.any_revoked(conn, keys, now)

    async def resync(self, now: datetime) -> bool:
        async with self._db.read() as session:
            rows = await repo.live_revocations(session, now)
        entries = [(key, (expire - now).total_seconds()) for key, expire in rows]
        return await self._cache.seed(entries)

    def _schedule_resync(self) -> None:
        if self._resync_task is None or self._resync_task.done():
            self._resync_task = asyncio.get_running_loop().create_task(self._resync_until_done())

    async def _resync_until_done(self) -> None:
        delay = 0.2
        while True:
            try:
                if await self.resync(utcnow()):
                    if self._stale:
                        log.info("revocation store re-seeded from the database")
                    self._stale = False
                    return
            except Exception:
                log.warning("revocation store re-seed failed; checks keep using the database", exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
