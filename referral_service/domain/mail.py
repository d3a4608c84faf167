"""The mail worker: drains the mail queue (``Mails``) through a ``Mailer``.

Each message is composed when it is sent: the recipient is looked up then (a queued reset for
an address without an account is skipped, silently), and the link token and code of a
verification or reset message are created then, in their own transaction, with only their
hashes stored. A failed send discards its token and retries with back-off (a new token next
time); a permanent refusal (a 5xx answer) marks the message failed. A message is sent once: the
claim is a lease no other worker can take, the outcome is written right after the mail system
accepted the message, and a clean shutdown lets sends in flight finish. Only a crash in the
instant between the mail system's acceptance and that write sends a message again, with the
same Message-ID.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from referral_service.domain.accounts import (
    MailTokenPolicy,
    code_hash,
    new_code,
    new_link_token,
    token_hash,
)
from referral_service.domain.backoff import backoff_delay
from referral_service.domain.clock import utcnow
from referral_service.domain.jobs import QueueWorker
from referral_service.domain.models import User
from referral_service.domain.ports import (
    PASSWORD_CHANGED,
    PASSWORD_RESET,
    VERIFY_EMAIL,
    MailClaim,
    Mailer,
    MailRejected,
    OutgoingMail,
    Store,
    UnitOfWork,
)

SENT, SKIPPED, FAILED = "sent", "skipped", "failed"


def _ttl_text(ttl: timedelta) -> str:
    minutes = int(ttl.total_seconds() // 60)
    if minutes % 60 == 0 and minutes >= 60:
        hours = minutes // 60
        return f"{hours} hour{'s' if hours != 1 else ''}"
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


class MailWorker(QueueWorker):
    name = "mail"

    def __init__(
        self,
        store: Store,
        mailer: Mailer,
        policy: MailTokenPolicy,
        *,
        retry_backoff: timedelta,
        retry_max: timedelta,
        max_attempts: int,
        concurrency: int,
        poll_seconds: float,
        lease: timedelta,
        on_outcome: Callable[[str, str], None] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__(store, concurrency=concurrency, poll_seconds=poll_seconds, clock=clock)
        self.mailer = mailer
        self._policy = policy
        self._backoff = retry_backoff.total_seconds()
        self._backoff_max = retry_max.total_seconds()
        self._max_attempts = max_attempts
        self._lease = lease
        #: Metrics: called with (kind, outcome) after each attempt.
        self._on_outcome = on_outcome

    async def _due(self, uow: UnitOfWork, now: datetime, limit: int) -> list[int]:
        return await uow.mails.due(now, limit)

    async def _next_due_time(self, uow: UnitOfWork, exclude: Sequence[int]) -> datetime | None:
        return await uow.mails.next_due_time(exclude)

    async def _release(self, uow: UnitOfWork, job_ids: Sequence[int], now: datetime) -> None:
        await uow.mails.release(job_ids, now)

    async def _attempt(self, job_id: int) -> None:
        now = self._now()
        claim = await self._store.transact(lambda uow: uow.mails.claim(job_id, now, now + self._lease))
        if claim is None:  # sent, or claimed by another process meanwhile
            return
        async with self._store.read() as uow:
            if claim.user_id is not None:
                user = await uow.users.get(claim.user_id)
            else:
                user = await uow.users.by_email_key(claim.email_key)
        if user is None or not self._wanted(claim.kind, user):
            await self._finish(claim, SKIPPED)
            return
        context = {"email": user.email}
        token = ""
        if claim.kind in (VERIFY_EMAIL, PASSWORD_RESET):
            token = new_link_token()
            context.update(await self._issue(claim.kind, user, token))
        mail = OutgoingMail(to=user.email, kind=claim.kind, message_id=claim.message_id, context=context)
        try:
            await self.mailer.send(mail)
        except asyncio.CancelledError:
            if token:
                await asyncio.shield(self._discard(token))
            raise
        except MailRejected as rejected:
            self._log.warning(
                "mail refused for good",
                extra={"mail_id": claim.id, "kind": claim.kind, "detail": str(rejected)},
            )
            await self._discard(token)
            await self._finish(claim, FAILED, error=str(rejected))
            return
        except Exception as error:
            await self._discard(token)
            await self._retry(claim, f"{type(error).__name__}: {error}")
            return
        await self._finish(claim, SENT)

    @staticmethod
    def _wanted(kind: str, user: User) -> bool:
        if kind == VERIFY_EMAIL:
            return user.is_active and not user.is_verified
        if kind == PASSWORD_RESET:
            return user.is_active
        return kind == PASSWORD_CHANGED

    async def _issue(self, kind: str, user: User, token: str) -> dict[str, str]:
        """Store the hashes of a new token (and code) for ``user``; the template context."""
        now = self._now()
        if kind == VERIFY_EMAIL:
            ttl, link, code = self._policy.verify_ttl, self._policy.verify_link, new_code()
        else:
            ttl, link, code = self._policy.reset_ttl, self._policy.reset_link, ""

        async def work(uow: UnitOfWork) -> None:
            await uow.email_tokens.add(
                user_id=user.id,
                purpose=kind,
                token_hash=token_hash(token),
                code_hash=code_hash(user.id, code) if code else None,
                now=now,
                expire_time=now + ttl,
            )

        await self._store.transact(work)
        context = {"link": link.replace("{token}", token), "expires_in": _ttl_text(ttl)}
        if code:
            context["code"] = code
        return context

    async def _discard(self, token: str) -> None:
        if token:
            try:
                await self._store.transact(lambda uow: uow.email_tokens.discard(token_hash(token)))
            except Exception:  # it expires unused anyway
                self._log.warning("could not discard the token of an unsent message")

    async def _finish(self, claim: MailClaim, state: str, *, error: str = "") -> None:
        await self._store.transact(lambda uow: uow.mails.finish(claim.id, state, self._now(), error=error))
        self._log.info(
            "mail %s", state, extra={"mail_id": claim.id, "kind": claim.kind, "attempt": claim.attempts}
        )
        if self._on_outcome is not None:
            self._on_outcome(claim.kind, state)

    async def _retry(self, claim: MailClaim, error: str) -> None:
        now = self._now()
        if claim.attempts >= self._max_attempts:
            self._log.error(
                "mail not sent after %d attempts; giving up",
                claim.attempts,
                extra={"mail_id": claim.id, "kind": claim.kind, "detail": error},
            )
            await self._finish(claim, FAILED, error=f"gave up: {error}")
            return
        wait = backoff_delay(claim.attempts, self._backoff, self._backoff_max)
        await self._store.transact(
            lambda uow: uow.mails.reschedule(claim.id, now, now + timedelta(seconds=wait), error=error)
        )
        self._log.warning(
            "mail not sent; retrying",
            extra={"mail_id": claim.id, "kind": claim.kind, "attempt": claim.attempts, "retry_in": wait},
        )
        if self._on_outcome is not None:
            self._on_outcome(claim.kind, "retry")
