"""The versioned cache and the plain values in the process: bounded LRU maps.

Correct for one process. With several workers and no Redis, each worker would hold its own
copy and could serve a value another worker invalidated: there :class:`NoCache` (never stores)
takes the versioned cache's place.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from referral_service.domain.ports import CacheLookup


class MemoryCache:
    """The versioned cache (``VersionedCache``) and the plain values (``KeyValueCache``), each
    bounded to ``max_entries`` (least recently used first out). ``clock`` is monotonic
    seconds."""

    def __init__(self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._values: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._invalidated: OrderedDict[str, int] = OrderedDict()
        self._plain: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._generation = 0
        self._forgotten = 0  # newest generation evicted from _invalidated: older stamps can't fill
        self._max = max_entries
        self._clock = clock

    # --- versioned ---------------------------------------------------------------------------

    async def lookup(self, key: str) -> CacheLookup:
        entry = self._values.get(key)
        if entry is not None:
            value, expires = entry
            if expires > self._clock():
                return CacheLookup(hit=True, value=value)
            del self._values[key]
        return CacheLookup(hit=False, stamp=self._generation)

    async def fill(self, key: str, stamp: object, value: bytes, ttl_seconds: float) -> None:
        if not isinstance(stamp, int) or ttl_seconds <= 0 or stamp < self._forgotten:
            return
        if self._invalidated.get(key, -1) > stamp:  # invalidated after the stamp was taken
            return
        self._values[key] = (value, self._clock() + ttl_seconds)
        self._values.move_to_end(key)
        while len(self._values) > self._max:
            self._values.popitem(last=False)

    async def invalidate(self, key: str) -> None:
        self._generation += 1
        self._values.pop(key, None)
        self._invalidated[key] = self._generation
        self._invalidated.move_to_end(key)
        while len(self._invalidated) > self._max:
            _, generation = self._invalidated.popitem(last=False)
            self._forgotten = max(self._forgotten, generation)

    # --- plain values ------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        entry = self._plain.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires <= self._clock():
            del self._plain[key]
            return None
        return value

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        if ttl_seconds <= 0:
            return
        self._plain[key] = (value, self._clock() + ttl_seconds)
        self._plain.move_to_end(key)
        while len(self._plain) > self._max:
            self._plain.popitem(last=False)


class NoCache:
    """A versioned cache and plain-value store that never stores: every lookup misses without a
    stamp (nothing to fill), every get answers None."""

    async def lookup(self, key: str) -> CacheLookup:
        return CacheLookup(hit=False)

    async def fill(self, key: str, stamp: object, value: bytes, ttl_seconds: float) -> None:
        return None

    async def invalidate(self, key: str) -> None:
        return None

    async def get(self, key: str) -> bytes | None:
        return None

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        return None
