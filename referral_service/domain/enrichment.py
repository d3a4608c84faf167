"""Profile enrichment once a user has verified their address: the background worker.

Only an owner's verified address is looked up (and its profile shown only while verified):
whoever registers somebody else's address must not read that person's profile.

Durability: verification inserts a ``pending`` row in ``user_profiles`` in the same transaction
as it marks the user verified, so a lookup is never lost, whatever happens to this process
afterwards. The worker
claims a row by moving its ``next_attempt_time`` forward by a lease (an atomic compare-and-set,
so two processes never run the same lookup), calls the provider outside any transaction, then
writes the outcome. A clean shutdown lets running lookups finish within the grace period and
hands the others back (lease cleared); a crash leaves them due again once the lease runs out.
At start-up, and every poll interval, the worker picks up whatever is due.

Verification is never delayed or failed by enrichment: it only inserts the row and wakes the
worker (the loop itself is ``jobs.QueueWorker``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from referral_service.domain.backoff import backoff_delay
from referral_service.domain.clock import utcnow
from referral_service.domain.jobs import QueueWorker
from referral_service.domain.models import ProfileState, User
from referral_service.domain.ports import ProfileLookup, ProfileOutcome, ProfileProvider, Store, UnitOfWork

log = logging.getLogger("referral_service.enrichment")


async def queue_lookup(uow: UnitOfWork, user: User, now: datetime) -> None:
    """Queue the profile lookup of a user whose address was just verified (once)."""
    if user.profile is None:
        await uow.profiles.add_job(user.id, now)


class EnrichmentWorker(QueueWorker):
    name = "enrichment"

    def __init__(
        self,
        store: Store,
        provider: ProfileProvider,
        *,
        max_attempts: int,
        retry_backoff: timedelta,
        retry_max: timedelta,
        concurrency: int,
        poll_seconds: float,
        lease: timedelta,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__(store, concurrency=concurrency, poll_seconds=poll_seconds, clock=clock)
        self.provider = provider
        self._max_attempts = max_attempts
        self._backoff = retry_backoff.total_seconds()
        self._backoff_max = retry_max.total_seconds()
        self._lease = lease

    async def _due(self, uow: UnitOfWork, now: datetime, limit: int) -> list[int]:
        return await uow.profiles.due(now, limit=limit)

    async def _next_due_time(self, uow: UnitOfWork, exclude: Sequence[int]) -> datetime | None:
        return await uow.profiles.next_due_time(exclude=exclude)

    async def _release(self, uow: UnitOfWork, job_ids: Sequence[int], now: datetime) -> None:
        await uow.profiles.release(job_ids, now)

    async def _attempt(self, user_id: int) -> None:
        now = self._now()
        claim = await self._store.transact(lambda uow: uow.profiles.claim(user_id, now, now + self._lease))
        if claim is None:  # finished or claimed by another process meanwhile
            return
        try:
            result = await self.provider.lookup(claim.email)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a provider bug must not kill the worker
            log.exception("enrichment provider %s raised", self.provider.name)
            result = ProfileLookup(ProfileOutcome.RETRY, detail=f"provider error ({type(error).__name__})")
        await self._store.transact(functools.partial(self._record, user_id, claim.attempts, result))
        log.info(
            "enrichment attempt",
            extra={
                "user_id": user_id,
                "provider": self.provider.name,
                "outcome": result.outcome.value,
                "attempt": claim.attempts,
                "detail": result.detail,
            },
        )

    async def _record(self, user_id: int, attempts: int, result: ProfileLookup, uow: UnitOfWork) -> None:
        """Store the outcome of one attempt: found, not found, failed for good, or retry later."""
        done = self._now()
        source = self.provider.name
        if result.outcome is ProfileOutcome.FOUND and result.person is not None and not result.person.empty():
            await uow.profiles.finish(user_id, ProfileState.FOUND, done, source=source, person=result.person)
        elif result.outcome in (ProfileOutcome.FOUND, ProfileOutcome.NOT_FOUND):
            await uow.profiles.finish(user_id, ProfileState.NOT_FOUND, done, source=source)
        elif result.outcome is ProfileOutcome.FAILED or attempts >= self._max_attempts:
            await uow.profiles.finish(user_id, ProfileState.FAILED, done, source=source, error=result.detail)
        else:
            wait = max(
                backoff_delay(attempts, self._backoff, self._backoff_max),
                min(result.retry_after_seconds or 0.0, self._backoff_max),
            )
            await uow.profiles.reschedule(user_id, done, done + timedelta(seconds=wait), error=result.detail)
