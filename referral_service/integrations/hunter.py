"""Hunter Email Verifier (``GET {base}/email-verifier?email=...``, key in ``X-API-KEY``).

- The email travels as a properly encoded query parameter (httpx encodes ``params``), the key
  only in the header: never in a URL, never in a log line.
- Every request has connect and read timeouts, and the whole verification (retries included)
  an overall deadline, so registration never waits on Hunter longer than that.
- 202 (verification still running) and 222 (the remote mail server answered strangely) are
  Hunter's "try again": retried a bounded number of times with exponential backoff, then
  reported ``unknown``.
- The decision is read from ``data.status`` (``result`` is deprecated).
- Timeouts, connection errors, 401/403 (bad key, plan), 429 (rate limit or quota), 5xx and
  malformed bodies count against a circuit breaker; while it is open, registrations do not call
  Hunter at all and get ``unavailable`` at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from referral_service.domain.backoff import backoff_delay
from referral_service.domain.clock import utcnow
from referral_service.domain.models import EmailStatus
from referral_service.domain.ports import Verification
from referral_service.integrations.http import retry_after
from referral_service.resilience import CircuitBreaker

log = logging.getLogger("referral_service.hunter")

_STATUSES = {
    "valid": EmailStatus.VALID,
    "accept_all": EmailStatus.ACCEPT_ALL,
    "webmail": EmailStatus.WEBMAIL,
    "invalid": EmailStatus.INVALID,
    "disposable": EmailStatus.DISPOSABLE,
    "unknown": EmailStatus.UNKNOWN,
}
_TRY_AGAIN = (202, 222)


class HunterVerifier:
    name = "hunter"

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        base_url: str,
        api_key: str,
        total_timeout: float,
        max_attempts: int,
        retry_backoff: float,
        breaker: CircuitBreaker,
    ) -> None:
        self._client = client
        self._url = f"{base_url.rstrip('/')}/email-verifier"
        self._api_key = api_key
        self._total = total_timeout
        self._attempts = max_attempts
        self._backoff = retry_backoff
        self.breaker = breaker

    def __repr__(self) -> str:  # never show the key
        return f"HunterVerifier(url={self._url!r})"

    def _unavailable(self, detail: str, retry: float | None = None) -> Verification:
        return Verification(EmailStatus.UNAVAILABLE, utcnow(), detail=detail, retry_after_seconds=retry)

    def _fail(self, detail: str, retry: float | None = None) -> Verification:
        self.breaker.failure(detail)
        return self._unavailable(detail, retry)

    async def verify(self, email: str) -> Verification:
        if not self.breaker.allow():
            return self._unavailable("circuit open", self.breaker.retry_after())
        try:
            async with asyncio.timeout(self._total):
                return await self._verify(email)
        except TimeoutError:
            return self._fail("timeout")

    async def _verify(self, email: str) -> Verification:
        for attempt in range(1, self._attempts + 1):
            try:
                response = await self._client.get(
                    self._url, params={"email": email}, headers={"X-API-KEY": self._api_key}
                )
            except httpx.TimeoutException:
                return self._fail("timeout")
            except httpx.HTTPError as error:
                return self._fail(f"connection error ({type(error).__name__})")
            status = response.status_code
            if status in _TRY_AGAIN:
                if attempt < self._attempts:
                    await asyncio.sleep(
                        max(retry_after(response) or 0.0, backoff_delay(attempt, self._backoff, 5.0))
                    )
                    continue
                self.breaker.success()  # Hunter is up; it just could not finish
                return Verification(
                    EmailStatus.UNKNOWN, utcnow(), detail=f"http {status} after {attempt} attempts"
                )
            if status == 200:
                return self._parse(response, email)
            if status in (401, 403):
                log.error(
                    "hunter refused the request (http %d): check REFERRAL_HUNTER_API_KEY and the plan",
                    status,
                )
                return self._fail(f"http {status}")
            if status == 429:
                return self._fail("http 429 (rate limit or quota)", retry_after(response))
            if 400 <= status < 500:
                # Hunter could not process this address (400 wrong params, 451 opted out):
                # an answer about the address, not an outage.
                self.breaker.success()
                return Verification(EmailStatus.UNKNOWN, utcnow(), detail=f"http {status}")
            return self._fail(f"http {status}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _parse(self, response: httpx.Response, email: str) -> Verification:
        try:
            body: Any = response.json()
            data = body["data"]
            raw_status = data["status"]
        except (ValueError, KeyError, TypeError):
            return self._fail("malformed response")
        if not isinstance(raw_status, str):
            return self._fail("malformed response")
        echoed = data.get("email")
        if isinstance(echoed, str) and echoed.casefold() != email.casefold():
            # An answer about another address: never decide on it.
            return self._fail("response is about another address")
        self.breaker.success()
        status = _STATUSES.get(raw_status)
        if status is None:
            log.warning("hunter returned an unknown status %r", raw_status[:32])
            return Verification(EmailStatus.UNKNOWN, utcnow(), detail="unrecognised status")
        return Verification(status, utcnow())

    async def close(self) -> None:
        await self._client.aclose()
