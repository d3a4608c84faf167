"""Email verification at registration: the provider interface, the decision, the cache.

The decision is taken on the provider's status only (for Hunter ``data.status``, never its
deprecated ``result``):

- ``valid``, ``accept_all``, ``webmail``: accepted. The outcome is stored as the user's
  deliverability, never as verification: only the owner following the verification message
  sets ``is_verified`` (``domain/accounts.py``);
- ``invalid``: refused, INVALID_ARGUMENT ``EMAIL_UNDELIVERABLE``;
- ``disposable``: refused, INVALID_ARGUMENT ``EMAIL_DISPOSABLE``;
- ``unknown`` and no answer at all (timeout, outage, 401/403/429/5xx, malformed response, open
  circuit): the policy decides: fail-open accepts, fail-closed refuses
  with UNAVAILABLE ``EMAIL_VERIFICATION_UNAVAILABLE`` and a RetryInfo.

Definite answers are cached (by a hash of the normalised address, so the address is not a
cache key in clear), so a retried registration does not spend provider credits again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timedelta

from referral_service.domain.errors import FieldViolation, InvalidArgument, Reason, Unavailable
from referral_service.domain.models import EmailStatus
from referral_service.domain.ports import EmailVerifier, KeyValueCache, Verification
from referral_service.domain.validation import Email

log = logging.getLogger("referral_service.verification")

ACCEPTED = frozenset({EmailStatus.VALID, EmailStatus.ACCEPT_ALL, EmailStatus.WEBMAIL})
#: Answers worth caching: they do not change from one minute to the next.
DEFINITE = ACCEPTED | {EmailStatus.INVALID, EmailStatus.DISPOSABLE}


class EmailVerification:
    def __init__(
        self,
        verifier: EmailVerifier,
        cache: KeyValueCache,
        *,
        fail_closed: bool,
        cache_ttl: timedelta,
        unavailable_retry_seconds: float = 5.0,
    ) -> None:
        self._verifier = verifier
        self._cache = cache
        self._fail_closed = fail_closed
        self._ttl = cache_ttl.total_seconds()
        self._retry = unavailable_retry_seconds

    def _key(self, email: Email) -> str:
        digest = hashlib.sha256(email.key.encode()).hexdigest()
        return f"email-verification:{self._verifier.name}:{digest}"

    async def _cached(self, key: str) -> Verification | None:
        raw = await self._cache.get(key)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            status = EmailStatus(data["status"])
            checked = datetime.fromisoformat(data["checked_time"])
        except (ValueError, KeyError, TypeError):
            return None
        return Verification(status, checked, detail="cached")

    async def check(self, email: Email) -> Verification:
        """Verify ``email`` (cached), and return the outcome to store on the user; raise the
        domain error that refuses the registration when it must be refused."""
        key = self._key(email)
        result = await self._cached(key)
        if result is None:
            result = await self._verifier.verify(email.display)
            if result.status in DEFINITE:
                payload = {"status": result.status.value, "checked_time": result.checked_time.isoformat()}
                await self._cache.set(key, json.dumps(payload).encode(), self._ttl)
        if result.status in ACCEPTED:
            return result
        if result.status is EmailStatus.INVALID:
            raise InvalidArgument(
                Reason.EMAIL_UNDELIVERABLE,
                "this email address does not receive mail",
                violations=[FieldViolation("email", "does not receive mail", "UNDELIVERABLE")],
            )
        if result.status is EmailStatus.DISPOSABLE:
            raise InvalidArgument(
                Reason.EMAIL_DISPOSABLE,
                "disposable email addresses are not accepted",
                violations=[FieldViolation("email", "is a disposable address", "DISPOSABLE")],
            )
        # unknown or unavailable
        log.warning(
            "email verification inconclusive",
            extra={
                "provider": self._verifier.name,
                "outcome": result.status.value,
                "detail": result.detail,
                "policy": "fail_closed" if self._fail_closed else "fail_open",
            },
        )
        if self._fail_closed:
            raise Unavailable(
                Reason.EMAIL_VERIFICATION_UNAVAILABLE,
                "the email address cannot be verified right now; retry shortly",
                retry_after_seconds=max(result.retry_after_seconds or 0.0, self._retry),
            )
        return result
