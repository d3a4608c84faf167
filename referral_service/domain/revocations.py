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
import time
from collections.abc import Sequence
from datetime import datetime

from referral_service.cache import Cache
from referral_service.domain.clock import utcnow
from referral_service.storage import repositories as repo
from referral_service.storage.db import Database

log = logging.getLogger("referral_service.revocations")


class Revocations:
    def __init__(self, db: Database, cache: Cache) -> None:
        self._db = db
        self._cache = cache
        self._resync_task: asyncio.Task[None] | None = None
        self._last_resync = 0.0

    async def publish(self, entries: Sequence[tuple[str, datetime]], now: datetime) -> None:
        """After the database commit: tell the fast store."""
        for key, expire in entries:
            ttl = (expire - now).total_seconds()
            if ttl > 0 and not await self._cache.revoke([key], ttl):
                self._schedule_resync()

    async def is_revoked(self, keys: Sequence[str], now: datetime) -> bool:
        answer = await self._cache.any_revoked(keys)
        if answer is not None:
            return answer
        if self._cache.shared:
            self._schedule_resync()
        async with self._db.read() as session:
            return await repo.any_revoked(session, keys, now)

    async def resync(self, now: datetime) -> bool:
        async with self._db.read() as session:
            rows = await repo.live_revocations(session, now)
        entries = [(key, (expire - now).total_seconds()) for key, expire in rows]
        return await self._cache.seed_revocations(entries)

    def _schedule_resync(self) -> None:
        if self._resync_task is not None and not self._resync_task.done():
            return
        if time.monotonic() - self._last_resync < 1.0:
            return
        self._last_resync = time.monotonic()
        self._resync_task = asyncio.get_running_loop().create_task(self._resync_quietly())

    async def _resync_quietly(self) -> None:
        try:
            if await self.resync(utcnow()):
                log.info("revocation store re-seeded from the database")
        except Exception:
            log.warning("revocation store re-seed failed; checks keep using the database", exc_info=True)

    async def close(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
