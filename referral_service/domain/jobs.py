"""The loop shared by the background workers that drain a durable queue in the database
(enrichment lookups, the mail queue).

A job is a row; a worker claims one by moving its ``next_attempt_time`` forward by a lease (an
atomic compare-and-set, so two processes never run the same job), does the work outside any
transaction, then records the outcome. A clean shutdown lets running jobs finish within the
grace period and hands the others back (due at once); a crash leaves them due again once the
lease runs out. At start-up, and every poll interval, the worker picks up whatever is due;
``notify()`` after a commit that queued a job makes it look at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import datetime

from referral_service.domain.clock import utcnow
from referral_service.domain.ports import Store, UnitOfWork


class QueueWorker(ABC):
    #: The task's name and the log's subject ("enrichment", "mail").
    name = "jobs"

    def __init__(
        self,
        store: Store,
        *,
        concurrency: int,
        poll_seconds: float,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self._now = clock
        self._concurrency = concurrency
        self._poll = poll_seconds
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._jobs: dict[int, asyncio.Task[None]] = {}
        self._log = logging.getLogger(f"referral_service.{self.name}")

    # --- what a queue provides -----------------------------------------------------------------

    @abstractmethod
    async def _due(self, uow: UnitOfWork, now: datetime, limit: int) -> list[int]: ...

    @abstractmethod
    async def _next_due_time(self, uow: UnitOfWork, exclude: Sequence[int]) -> datetime | None: ...

    @abstractmethod
    async def _release(self, uow: UnitOfWork, job_ids: Sequence[int], now: datetime) -> None: ...

    @abstractmethod
    async def _attempt(self, job_id: int) -> None:
        """Claim the job and run one attempt; a job claimed elsewhere meanwhile is left alone."""

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def notify(self) -> None:
        """A new job was committed: scan now instead of at the next poll."""
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Stop claiming work, give running jobs ``grace`` seconds, then cancel the rest and
        hand them back so the next start (of any process) runs them at once."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            # The loop only reads and waits (possibly for a free slot): cancelling it is safe.
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        running = list(self._jobs.items())
        if not running:
            return
        _, pending = await asyncio.wait([task for _, task in running], timeout=grace)
        for task in pending:
            task.cancel()
        if not pending:
            return
        await asyncio.gather(*pending, return_exceptions=True)
        unfinished = [job_id for job_id, task in running if task in pending]
        try:
            await self._store.transact(lambda uow: self._release(uow, unfinished, self._now()))
        except Exception:
            self._log.warning(
                "could not hand back %d %s jobs; due after the lease", len(unfinished), self.name
            )
        else:
            self._log.info("handed back %d unfinished %s jobs", len(unfinished), self.name)

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self._poll
        batch = self._concurrency * 4
        while not self._stopping:
            self._wake.clear()
            try:
                async with self._store.read() as uow:
                    due = await self._due(uow, self._now(), batch)
                    upcoming = await self._next_due_time(uow, [*self._jobs, *due])
                delay = self._poll
                if upcoming is not None:  # a retry falls due before the next poll
                    delay = min(self._poll, max((upcoming - self._now()).total_seconds(), 0.01))
            except Exception as error:
                self._log.warning("%s scan failed (%s); retrying", self.name, type(error).__name__)
                due, delay = [], min(max(delay, 1.0) * 2, 60.0)
            started = 0
            for job_id in due:
                if job_id in self._jobs:  # still running here although its lease ran out
                    continue
                await self._slots.acquire()
                if self._stopping:
                    self._slots.release()
                    return
                task = asyncio.get_running_loop().create_task(self._job(job_id))
                self._jobs[job_id] = task
                task.add_done_callback(functools.partial(self._done, job_id))
                started += 1
            if started >= batch:  # a full batch: there may be more due now
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _done(self, job_id: int, _task: asyncio.Task[None]) -> None:
        self._jobs.pop(job_id, None)
        self._slots.release()
        self._wake.set()  # a slot is free: a full batch may be waiting

    async def _job(self, job_id: int) -> None:
        try:
            await self._attempt(job_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Database trouble: the lease expires and the job becomes due again.
            self._log.exception("%s job %d failed unexpectedly", self.name, job_id)
