"""argon2id password hashing (the ``PasswordHasher`` port), off the event loop, in a bounded pool.

argon2-cffi releases the GIL while hashing, so a thread pool sized to the cores uses them all.
A semaphore bounds the jobs handed to the pool: a burst of logins waits as cheap coroutines
instead of piling work (19 MiB of memory each) into the executor's queue.

Metrics: the jobs waiting for a thread (``referral_password_hash_queue_depth``), how long each
waited (``referral_password_hash_wait_seconds``) and how long it ran on its thread. A job whose
caller gave up (cancelled) before a thread took it is not run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from argon2 import PasswordHasher as _Argon2
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from referral_service import metrics
from referral_service.domain.ports import VerifyResult

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Argon2Params:
    time_cost: int = 2
    memory_kib: int = 19 * 1024
    parallelism: int = 1


class Argon2PasswordHasher:
    """The ``PasswordHasher`` port with argon2id."""

    def __init__(self, params: Argon2Params, workers: int, queue: int) -> None:
        self._argon2 = _Argon2(
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
        self._slots = asyncio.Semaphore(workers + queue)
        # A real hash to verify unknown emails against, so they take as long as wrong passwords.
        # Made on first use, in the pool: hashing at construction would block the event loop.
        self._dummy: str | None = None

    async def _run(self, fn: Callable[..., T], *args: str) -> T:
        job: _Job[T] = _Job(fn)
        try:
            async with self._slots:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._pool, job.run, *args)
        finally:
            job.abandon()

    async def hash(self, password: str) -> str:
        return await self._run(self._argon2.hash, password)

    def _verify_sync(self, stored: str, password: str) -> VerifyResult:
        try:
            self._argon2.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return VerifyResult(ok=False)
        if self._argon2.check_needs_rehash(stored):
            return VerifyResult(ok=True, new_hash=self._argon2.hash(password))
        return VerifyResult(ok=True)

    async def verify(self, stored: str | None, password: str) -> VerifyResult:
        """Verify ``password``; with ``stored=None`` (unknown user) verify against a dummy hash
        and report failure, taking the same time."""
        if stored is None:
            if self._dummy is None:
                self._dummy = await self.hash("dummy password used to equalise login timing")
            await self._run(self._verify_sync, self._dummy, password)
            return VerifyResult(ok=False)
        return await self._run(self._verify_sync, stored, password)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Job(Generic[T]):
    """One hash or verification, counted in the queue from its request until a thread takes it
    (or its caller gives up: whichever comes first takes it out of the queue)."""

    __slots__ = ("_claimed", "_fn", "_lock", "_queued")

    def __init__(self, fn: Callable[..., T]) -> None:
        self._fn = fn
        self._queued = time.perf_counter()
        self._lock = threading.Lock()
        self._claimed = False
        metrics.HASH_QUEUE.inc()

    def _claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
        metrics.HASH_QUEUE.dec()
        return True

    def run(self, *args: str) -> T:
        if not self._claim():
            raise asyncio.CancelledError  # the caller is gone: do not spend 19 MiB and ~25 ms
        started = time.perf_counter()
        metrics.HASH_WAIT.observe(started - self._queued)
        try:
            return self._fn(*args)
        finally:
            metrics.HASH_DURATION.observe(time.perf_counter() - started)

    def abandon(self) -> None:
        self._claim()
