"""Test doubles for the domain suite: a clock the test moves, a password hasher without argon2,
the fast stores (cache, key-value, revocations) in a few lines each, and scripted providers.
Storage is never faked: the domain runs on ``MemoryStore``, which passes the Store contract."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from referral_service.domain.models import EmailStatus
from referral_service.domain.ports import CacheLookup, ProfileLookup, Verification, VerifyResult
from referral_service.memory.cache import MemoryCache


class FakeClock:
    """``clock=`` for the use cases. Starts at the real time (signed tokens are checked against
    it by PyJWT) and moves only when told."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta | None = None, **units: float) -> datetime:
        self.now += delta or timedelta(**units)
        return self.now

    def seconds(self) -> float:
        """The same time as seconds, for the fast stores' expiries."""
        return self.now.timestamp()


class FastHasher:
    """The ``PasswordHasher`` interface without the cost. ``scheme`` prefixes every hash; a
    stored hash of another scheme verifies and asks for a rehash (as argon2 parameters
    changing do)."""

    def __init__(self, scheme: str = "v2") -> None:
        self.scheme = scheme
        self.verified_unknown = 0

    async def hash(self, password: str) -> str:
        await asyncio.sleep(0)  # a real hasher yields to the loop
        return f"{self.scheme}${password[::-1]}"

    async def verify(self, stored: str | None, password: str) -> VerifyResult:
        await asyncio.sleep(0)
        if stored is None:
            self.verified_unknown += 1
            return VerifyResult(ok=False)
        scheme, _, digest = stored.partition("$")
        if digest != password[::-1]:
            return VerifyResult(ok=False)
        if scheme != self.scheme:
            return VerifyResult(ok=True, new_hash=await self.hash(password))
        return VerifyResult(ok=True)


class FakeCache(MemoryCache):
    """The in-process twin (``MemoryCache``) on the fake clock, recording what the use cases
    asked of it. ``down`` makes it behave as an unreachable store does: misses without a stamp,
    no writes."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock.seconds)
        self.fills: list[tuple[str, bytes, float]] = []
        self.invalidations: list[str] = []
        self.down = False

    async def lookup(self, key: str) -> CacheLookup:
        return CacheLookup(hit=False) if self.down else await super().lookup(key)

    async def fill(self, key: str, stamp: object, value: bytes, ttl_seconds: float) -> None:
        if not self.down:
            self.fills.append((key, value, ttl_seconds))
            await super().fill(key, stamp, value, ttl_seconds)

    async def invalidate(self, key: str) -> None:
        self.invalidations.append(key)
        await super().invalidate(key)

    async def get(self, key: str) -> bytes | None:
        return None if self.down else await super().get(key)

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        if not self.down:
            await super().set(key, value, ttl_seconds)


class FakeRevocationCache:
    """``RevocationCache``: process-local (``shared=False``: answers True or "cannot tell") or
    shared (answers False too, once seeded). ``down`` refuses writes and cannot tell."""

    def __init__(self, clock: FakeClock, *, shared: bool = False) -> None:
        self._clock = clock
        self.shared = shared
        self.revoked: dict[str, float] = {}
        self.seeded = False
        self.down = False

    async def revoke(self, keys: Sequence[str], ttl_seconds: float) -> bool:
        if self.down:
            return False
        for key in keys:
            self.revoked[key] = max(self.revoked.get(key, 0.0), self._clock.seconds() + ttl_seconds)
        return True

    async def any_revoked(self, keys: Sequence[str]) -> bool | None:
        if self.down:
            return None
        now = self._clock.seconds()
        if any(self.revoked.get(key, 0.0) > now for key in keys):
            return True
        return False if self.shared and self.seeded else None

    async def seed(self, entries: Sequence[tuple[str, float]]) -> bool:
        if self.down:
            return False
        for key, ttl in entries:
            await self.revoke([key], ttl)
        self.seeded = True
        return True


@dataclass
class FakeVerifier:
    """An ``EmailVerifier`` answering ``status`` and counting its calls."""

    clock: FakeClock
    status: EmailStatus = EmailStatus.VALID
    name: str = "fake-verifier"
    calls: list[str] = field(default_factory=list)

    async def verify(self, email: str) -> Verification:
        self.calls.append(email)
        return Verification(self.status, self.clock(), detail="scripted")

    async def close(self) -> None:
        return None


class FakeProvider:
    """A ``ProfileProvider`` answering from a script, one answer per call (the last repeats);
    an exception in the script is raised. ``hold`` makes every lookup wait until set."""

    name = "fake-provider"

    def __init__(self, *answers: ProfileLookup | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []
        self.called = asyncio.Event()
        self.hold: asyncio.Event | None = None

    async def lookup(self, email: str) -> ProfileLookup:
        self.calls.append(email)
        self.called.set()
        if self.hold is not None:
            await self.hold.wait()
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def close(self) -> None:
        return None
