"""Capped exponential back-off with jitter: the one rule every retry loop of the service uses
(enrichment retries, re-seeding and repairing the fast stores, probing the database)."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float, cap: float, jitter: float = 0.2) -> float:
    """Delay before retry number ``attempt`` (1-based): ``base * 2**(attempt-1)``, capped, with
    +-``jitter`` proportional randomness so that retries from many callers spread out."""
    delay: float = min(base * 2.0 ** max(attempt - 1, 0), cap)
    factor: float = 1 + random.uniform(-jitter, jitter)  # noqa: S311 - not crypto
    return max(delay * factor, 0.0)
