"""The revocation store in the process: it knows only what this process revoked (or was seeded
with), so it answers True or "cannot tell" (None), never "not revoked": another worker or
replica may have revoked the key, and the caller asks the database."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


class MemoryRevocations:
    shared = False

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._revoked: dict[str, float] = {}  # key -> when it expires (clock seconds)
        self._max = max_entries
        self._clock = clock

    async def revoke(self, keys: Sequence[str], ttl_seconds: float) -> bool:
        now = self._clock()
        if len(self._revoked) > self._max:
            self._revoked = {k: t for k, t in self._revoked.items() if t > now}
        for key in keys:
            self._revoked[key] = max(self._revoked.get(key, 0.0), now + ttl_seconds)
        return True

    async def any_revoked(self, keys: Sequence[str]) -> bool | None:
        now = self._clock()
        return True if any(self._revoked.get(key, 0.0) > now for key in keys) else None

    async def seed(self, entries: Sequence[tuple[str, float]]) -> bool:
        for key, ttl in entries:
            await self.revoke([key], ttl)
        return True
