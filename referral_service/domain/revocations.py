"""Revoked access tokens (``jti:<id>``) and sessions (``sid:<id>``).

The database is the record (it survives restarts of Redis, which keeps nothing on disk).
With a shared fast store (Redis), it answers the per-call check; when it cannot (down, or
restarted empty and not yet re-seeded) the check asks the database, and the fast store is
re-seeded from the database in the background. With the process-local store, it only
short-cuts tokens this process revoked; every other check asks the database (one primary-key
look-up), because another worker or replica may have revoked the token. A revoked token is
never accepted because of a cache outage or a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from referral_service.domain.backoff import backoff_delay
from referral_service.domain.clock import utcnow
from referral_service.domain.ports import RevocationCache, Store, UnitOfWork

log = logging.getLogger("referral_service.revocations")


class Revocations:
    def __init__(
        self, store: Store, cache: RevocationCache, *, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self._store = store
        self._cache = cache
        self._now = clock
        #: A revocation could not be written to the shared store: checks use the database until
        #: a re-seed has copied every live revocation back.
        self._stale = False
        self._resync_task: asyncio.Task[None] | None = None

    @property
    def shared(self) -> bool:
        return self._cache.shared

    async def record(self, uow: UnitOfWork, entries: Sequence[tuple[str, datetime]]) -> None:
        """Inside the revoking transaction: the durable record."""
        await uow.sessions.add_revocations(entries)

    async def publish(self, entries: Sequence[tuple[str, datetime]], now: datetime) -> None:
        """After the commit: tell the fast store."""
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
        async with self._store.read() as uow:
            return await uow.sessions.any_revoked(keys, now)

    async def resync(self) -> bool:
        """Copy every live revocation from the database into the fast store."""
        now = self._now()
        async with self._store.read() as uow:
            rows = await uow.sessions.live_revocations(now)
        return await self._cache.seed([(key, (expire - now).total_seconds()) for key, expire in rows])

    def _schedule_resync(self) -> None:
        if self._resync_task is None or self._resync_task.done():
            self._resync_task = asyncio.get_running_loop().create_task(self._resync_until_done())

    async def _resync_until_done(self) -> None:
        attempt = 0
        while True:
            try:
                if await self.resync():
                    if self._stale:
                        log.info("revocation store re-seeded from the database")
                    self._stale = False
                    return
            except Exception:
                log.warning("revocation store re-seed failed; checks keep using the database", exc_info=True)
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt, 0.2, 5.0))

    async def close(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
