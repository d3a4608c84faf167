"""Profile enrichment after registration: the provider interface and the background worker.

Durability: registration inserts a ``pending`` row in ``user_profiles`` in the same transaction
as the user, so a lookup is never lost, whatever happens to this process afterwards. The worker
claims a row by moving its ``next_attempt_time`` forward by a lease (an atomic compare-and-set,
so two processes never run the same lookup), calls the provider outside any transaction, then
writes the outcome. A clean shutdown lets running lookups finish within the grace period and
hands the others back (lease cleared); a crash leaves them due again once the lease runs out.
At start-up, and every poll interval, the worker picks up whatever is due.

Registration is never delayed or failed by enrichment: it only inserts the row and wakes the
worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from referral_service.domain.backoff import backoff_delay
from referral_service.domain.clock import utcnow
from referral_service.domain.models import ProfileState
from referral_service.domain.ports import ProfileLookup, ProfileOutcome, ProfileProvider, Store, UnitOfWork

log = logging.getLogger("referral_service.enrichment")


class EnrichmentWorker:
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
        self._store = store
        self._now = clock
        self.provider = provider
        self._max_attempts = max_attempts
        self._backoff = retry_backoff.total_seconds()
        self._backoff_max = retry_max.total_seconds()
        self._concurrency = concurrency
        self._poll = poll_seconds
        self._lease = lease
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._jobs: dict[int, asyncio.Task[None]] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="enrichment")

    def notify(self) -> None:
        """A new pending lookup was committed: scan now instead of at the next poll."""
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Stop claiming work, give running lookups ``grace`` seconds, then cancel the rest and
        hand them back so the next start (of any process) runs them at once."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            # The loop only reads and waits (possibly for a free slot): cancelling it is safe.
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        running = list(self._jobs.items())
        if running:
            _, pending = await asyncio.wait([task for _, task in running], timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                unfinished = [user_id for user_id, task in running if task in pending]
                try:
                    await self._store.transact(lambda uow: uow.profiles.release(unfinished, self._now()))
                except Exception:
                    log.warning(
                        "could not hand back %d enrichment lookups; due after the lease", len(unfinished)
                    )
                else:
                    log.info("handed back %d unfinished enrichment lookups", len(unfinished))

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self._poll
        while not self._stopping:
            self._wake.clear()
            try:
                async with self._store.read() as uow:
                    due = await uow.profiles.due(self._now(), limit=self._concurrency * 4)
                    upcoming = await uow.profiles.next_due_time(exclude=[*self._jobs, *due])
                delay = self._poll
                if upcoming is not None:  # a retry falls due before the next poll
                    delay = min(self._poll, max((upcoming - self._now()).total_seconds(), 0.01))
            except Exception as error:
                log.warning("enrichment scan failed (%s); retrying", type(error).__name__)
                due, delay = [], min(max(delay, 1.0) * 2, 60.0)
            started = 0
            for user_id in due:
                if user_id in self._jobs:  # still running here although its lease ran out
                    continue
                await self._slots.acquire()
                if self._stopping:
                    self._slots.release()
                    return
                task = asyncio.get_running_loop().create_task(self._job(user_id))
                self._jobs[user_id] = task
                task.add_done_callback(functools.partial(self._done, user_id))
                started += 1
            if started >= self._concurrency * 4:  # a full batch: there may be more due now
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _done(self, user_id: int, _task: asyncio.Task[None]) -> None:
        self._jobs.pop(user_id, None)
        self._slots.release()
        self._wake.set()  # a slot is free: a full batch may be waiting

    async def _job(self, user_id: int) -> None:
        try:
            await self._attempt(user_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Database trouble: the lease expires and the lookup becomes due again.
            log.exception("enrichment of user %d failed unexpectedly", user_id)

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
