"""GCRA rate limits in the process (see ``referral_service.redis.limiter`` for the algorithm):
the limiter without Redis, and the per-process fallback while Redis cannot answer."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from referral_service.domain.ports import RateDecision


class MemoryRateLimiter:
    """Bounded in size: least recently used keys are dropped (a dropped key has its full budget
    again, which only errs towards allowing). ``clock`` is monotonic seconds."""

    def __init__(self, max_keys: int = 200_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._tat: OrderedDict[str, float] = OrderedDict()  # key -> theoretical arrival time
        self._max = max_keys
        self._clock = clock

    async def acquire(self, key: str, limit: int, period: float) -> RateDecision:
        now = self._clock()
        interval = period / limit
        tat = max(self._tat.get(key, now), now)
        new = tat + interval
        # A tolerance of a microsecond: (now + period) - now may exceed period by float rounding,
        # which would refuse the first call of a 1/PERIOD limit.
        if new - now > period + 1e-6:
            return RateDecision(False, new - period - now, 0)
        self._tat[key] = new
        self._tat.move_to_end(key)
        while len(self._tat) > self._max:
            self._tat.popitem(last=False)
        return RateDecision(True, 0.0, int((period - (new - now)) / interval))

    async def release(self, key: str, limit: int, period: float) -> None:
        now = self._clock()
        tat = self._tat.get(key)
        if tat is not None:
            new = tat - period / limit
            if new <= now:
                del self._tat[key]
            else:
                self._tat[key] = new
