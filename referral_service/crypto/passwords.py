"""argon2id password hashing (the ``PasswordHasher`` port), off the event loop, in a bounded pool.

argon2-cffi releases the GIL while hashing, so a thread pool sized to the cores uses them all.
A semaphore bounds the jobs handed to the pool: a burst of logins waits as cheap coroutines
instead of piling work (19 MiB of memory each) into the executor's queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from argon2 import PasswordHasher as _Argon2
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

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
        async with self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, fn, *args)

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
