"""The circuit breaker shared by every outbound dependency (Redis, Hunter, enrichment
providers). Retries back off by the one rule, ``domain/backoff.py``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from referral_service import metrics

log = logging.getLogger("referral_service.resilience")


class CircuitBreaker:
    """Closed -> (``threshold`` consecutive failures) -> open for ``reset_seconds`` -> one trial
    call (half-open) -> closed on success, open again on failure.

    ``name`` identifies the dependency in the logs; ``fallback`` says what callers do meanwhile.
    """

    def __init__(
        self,
        threshold: int,
        reset_seconds: float,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        name: str = "redis",
        fallback: str = "serving from the database",
    ) -> None:
        self._threshold = threshold
        self._reset = reset_seconds
        self._failures = 0
        self._open_until = 0.0
        self._trial = False
        self._clock = clock
        self._on_change = on_change
        self._name = name
        self._fallback = fallback
        self.closed = True
        self._open_gauge = metrics.BREAKER_OPEN.labels(dependency=name)
        self._open_gauge.set(0)
        self._rejected = metrics.BREAKER_REJECTED.labels(dependency=name)
        self._failed = metrics.DEPENDENCY_FAILURES.labels(dependency=name)

    @property
    def name(self) -> str:
        return self._name

    def allow(self) -> bool:
        if self.closed:
            return True
        if self._trial or self._clock() < self._open_until:
            self._rejected.inc()
            return False
        self._trial = True
        return True

    def retry_after(self) -> float:
        """Seconds until the breaker lets a trial call through (0 when closed)."""
        if self.closed:
            return 0.0
        return max(self._open_until - self._clock(), 0.0)

    def success(self) -> None:
        self._failures = 0
        self._trial = False
        if not self.closed:
            self.closed = True
            self._open_gauge.set(0)
            log.info("%s is reachable again", self._name)
            if self._on_change:
                self._on_change(True)

    def failure(self, error: BaseException | str) -> None:
        self._failures += 1
        self._trial = False
        self._failed.inc()
        if self.closed and self._failures >= self._threshold:
            self.closed = False
            self._open_gauge.set(1)
            detail = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            log.warning(
                "%s unavailable (%s); %s for at least %.1fs",
                self._name,
                detail,
                self._fallback,
                self._reset,
            )
            if self._on_change:
                self._on_change(False)
        if not self.closed:
            self._open_until = self._clock() + self._reset
