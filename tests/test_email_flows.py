"""Email ownership, password reset and the mail queue, through the wire: a real SMTP server on
loopback (aiosmtpd) or the development Maildir, on SQLite and PostgreSQL with real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from email.utils import parseaddr
from typing import Any

import grpc
import pytest
from referral.v1 import auth_pb2

from tests.conftest import PASSWORD, Api, Stack, bearer, start_api, stop_api
from tests.errors import expect_error
from tests.mail import Smtpd, code_of, html_of, link_of, text_of, token_of, wait_for

NEW_PASSWORD = "a brand new passphrase 42"


@pytest.fixture
def smtpd() -> AsyncIterator[Smtpd]:
    server = Smtpd()
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


def smtp_settings(smtpd: Smtpd, **more: Any) -> dict[str, Any]:
    return {
        "smtp_url": f"smtp://127.0.0.1:{smtpd.port}?starttls=off",
        "mail_from": "Referrals <no-reply@referrals.example>",
        "public_url": "https://referrals.example",
        "mail_retry_backoff": timedelta(milliseconds=100),
        "mail_retry_max": timedelta(milliseconds=400),
        "mail_poll_seconds": 0.2,
        **more,
    }


@pytest.fixture
async def mail_api(stack: Stack, smtpd: Smtpd) -> AsyncIterator[Api]:
    api = await start_api(stack, **smtp_settings(smtpd))
    try:
        yield api
    finally:
        await stop_api(api)


async def me(api: Api, email: str, password: str = PASSWORD) -> auth_pb2.User:
    tokens = await api.login(email, password)
    response = await api.auth.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token)
    )
    return response.user


def verify_token(token: str) -> auth_pb2.VerifyEmailRequest:
    return auth_pb2.VerifyEmailRequest(token=token)


# --- verification ------------------------------------------------------------------------------


async def test_register_read_the_mail_verify(mail_api: Api, smtpd: Smtpd) -> None:
    api = mail_api
    email = api.unique_email("owner")
    user = await api.register(email)
    assert not user.is_verified
    assert not user.HasField("verify_time")
    (message,) = await wait_for(smtpd.read, email, "verify_email")
    # What the recipient sees: our sender, a stable Message-ID, text and HTML, a link and a code.
    assert message["From"] == "Referrals <no-reply@referrals.example>"
    assert parseaddr(message["Message-ID"])[1].endswith("@referrals.example")
    assert message["Auto-Submitted"] == "auto-generated"
    link = link_of(message)
    assert link.startswith("https://referrals.example/verify-email#token=")
    assert link in html_of(message)
    code = code_of(message)
    assert code in html_of(message)
    assert "24 hours" in text_of(message)
    assert smtpd.envelopes[-1] == ("no-reply@referrals.example", [email])

    verified = (await api.auth.VerifyEmail(verify_token(token_of(message)))).user
    assert (verified.id, verified.is_verified) == (user.id, True)
    assert verified.HasField("verify_time")
    assert (await me(api, email)).is_verified
    # The code of the same message died with its link.
    await expect_error(
        api.auth.VerifyEmail(auth_pb2.VerifyEmailRequest(email=email, code=code)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EMAIL_TOKEN_INVALID",
    )


async def test_the_code_verifies_for_apps_and_wrong_codes_run_out(mail_api: Api, smtpd: Smtpd) -> None:
    api = mail_api
    email = api.unique_email("app")
    await api.register(email)
    (message,) = await wait_for(smtpd.read, email, "verify_email")
    code = code_of(message)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    error = await expect_error(
        api.auth.VerifyEmail(auth_pb2.VerifyEmailRequest(email=email, code=wrong)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EMAIL_TOKEN_INVALID",
    )
    assert "code" in error.fields
    # Case and spaces of the email do not matter; the right code works.
    user = (
        await api.auth.VerifyEmail(auth_pb2.VerifyEmailRequest(email=f" {email.upper()} ", code=code))
    ).user
    assert user.is_verified

    # Five wrong guesses end a code; its link still works.
    other = api.unique_email("guessed")
    await api.register(other)
    (message,) = await wait_for(smtpd.read, other, "verify_email")
    code = code_of(message)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(5):
        await expect_error(
            api.auth.VerifyEmail(auth_pb2.VerifyEmailRequest(email=other, code=wrong)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "EMAIL_TOKEN_INVALID",
        )
    await expect_error(
        api.auth.VerifyEmail(auth_pb2.VerifyEmailRequest(email=other, code=code)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EMAIL_TOKEN_INVALID",
    )
    assert (await api.auth.VerifyEmail(verify_token(token_of(message)))).user.is_verified


async def test_a_token_used_twice_expired_unknown_or_of_another_kind(stack: Stack, smtpd: Smtpd) -> None:
    api = await start_api(stack, **smtp_settings(smtpd, email_verification_ttl=timedelta(minutes=1)))
    try:
        email = api.unique_email("twice")
        await api.register(email)
        (message,) = await wait_for(smtpd.read, email, "verify_email")
        token = token_of(message)
        await api.auth.VerifyEmail(verify_token(token))
        error = await expect_error(
            api.auth.VerifyEmail(verify_token(token)), grpc.StatusCode.FAILED_PRECONDITION, "EMAIL_TOKEN_USED"
        )
        assert "token" in error.fields
        for bad in ("x" * 43, token[:-1] + ("A" if token[-1] != "A" else "B"), "short", "bad token!" * 5):
            await expect_error(
                api.auth.VerifyEmail(verify_token(bad)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "EMAIL_TOKEN_INVALID",
            )
        # A reset token is not a verification token, and the other way round.
        await api.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=email))
        (reset,) = await wait_for(smtpd.read, email, "password_reset")
        await expect_error(
            api.auth.VerifyEmail(verify_token(token_of(reset))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "EMAIL_TOKEN_INVALID",
        )
        await expect_error(
            api.auth.ResetPassword(auth_pb2.ResetPasswordRequest(token=token, new_password=NEW_PASSWORD)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "EMAIL_TOKEN_INVALID",
        )
        # Expired: the token of another account, whose ttl (1 minute) has passed.
        late = api.unique_email("late")
        await api.register(late)
        (message,) = await wait_for(smtpd.read, late, "verify_email")
        await api.app.store.transact(lambda uow: _age_tokens(uow, timedelta(minutes=2)))
        await expect_error(
            api.auth.VerifyEmail(verify_token(token_of(message))),
            grpc.StatusCode.FAILED_PRECONDITION,
            "EMAIL_TOKEN_EXPIRED",
        )
        assert not (await me(api, late)).is_verified
        # Both fields, or neither, is a plain bad request.
        await expect_error(
            api.auth.VerifyEmail(auth_pb2.VerifyEmailRequest(token="t" * 43, email=late, code="123456")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "VALIDATION_FAILED",
        )
        await expect_error(
            api.auth.VerifyEmail(auth_pb2.VerifyEmailRequest()),
            grpc.StatusCode.INVALID_ARGUMENT,
            "VALIDATION_FAILED",
        )
    finally:
        await stop_api(api)


async def _age_tokens(uow: Any, by: timedelta) -> None:
    """Move every email token's expiry ``by`` back (as if that much time had passed)."""
    from sqlalchemy import select, update

    from referral_service.storage.core import EMAIL_TOKENS

    rows = (await uow.connection.execute(select(EMAIL_TOKENS.c.id, EMAIL_TOKENS.c.expire_time))).all()
    for token_id, expire_time in rows:
        await uow.connection.execute(
            update(EMAIL_TOKENS).where(EMAIL_TOKENS.c.id == token_id).values(expire_time=expire_time - by)
        )


async def test_a_token_verifies_only_its_own_account(mail_api: Api, smtpd: Smtpd) -> None:
    api = mail_api
    mine, theirs = api.unique_email("mine"), api.unique_email("theirs")
    await api.register(mine)
    await api.register(theirs)
    (message,) = await wait_for(smtpd.read, theirs, "verify_email")
    verified = (await api.auth.VerifyEmail(verify_token(token_of(message)))).user
    assert verified.email == theirs
    assert not (await me(api, mine)).is_verified
    # Their code does not verify my account either.
    await expect_error(
        api.auth.VerifyEmail(auth_pb2.VerifyEmailRequest(email=mine, code=code_of(message))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EMAIL_TOKEN_INVALID",
    )


async def test_resend_answers_the_same_for_everyone_and_sends_only_when_useful(
    mail_api: Api, smtpd: Smtpd
) -> None:
    api = mail_api
    pending, verified, nobody = (
        api.unique_email("pending"),
        api.unique_email("done"),
        api.unique_email("nobody"),
    )
    await api.register(pending)
    await api.register(verified)
    (message,) = await wait_for(smtpd.read, verified, "verify_email")
    await api.auth.VerifyEmail(verify_token(token_of(message)))
    for address in (pending, verified, nobody):
        response = await api.auth.ResendVerificationEmail(
            auth_pb2.ResendVerificationEmailRequest(email=address)
        )
        assert response == auth_pb2.ResendVerificationEmailResponse()
    first, second = await wait_for(smtpd.read, pending, "verify_email", count=2)
    # Both links work until one is used; then the other is used up too.
    await api.auth.VerifyEmail(verify_token(token_of(second)))
    await expect_error(
        api.auth.VerifyEmail(verify_token(token_of(first))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EMAIL_TOKEN_USED",
    )
    await _drained(api)
    assert len([m for m in smtpd.read() if m["To"] == verified]) == 1  # nothing more for a verified one
    assert not [m for m in smtpd.read() if m["To"] == nobody]
    await expect_error(
        api.auth.ResendVerificationEmail(auth_pb2.ResendVerificationEmailRequest(email="not an email")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )


async def _drained(api: Api, attempts: int = 600) -> None:
    """Wait until the mail queue holds nothing pending."""
    from sqlalchemy import func, select

    from referral_service.storage.core import MAILS

    for _ in range(attempts):
        async with api.app.store.read() as uow:
            pending = (
                await uow.connection.execute(select(func.count()).where(MAILS.c.state == "pending"))  # type: ignore[attr-defined]
            ).scalar_one()
        if pending == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the mail queue did not drain")


@pytest.mark.sqlite_stack
async def test_resend_is_limited_per_email_whoever_asks(stack: Stack, smtpd: Smtpd) -> None:
    api = await start_api(stack, **smtp_settings(smtpd, rate_limit_verification_resend_account="2/1h"))
    try:
        for address in (api.unique_email("limited"), "nobody-limited@example.com"):
            for _ in range(2):
                await api.auth.ResendVerificationEmail(auth_pb2.ResendVerificationEmailRequest(email=address))
            error = await expect_error(
                api.auth.ResendVerificationEmail(auth_pb2.ResendVerificationEmailRequest(email=address)),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "RATE_LIMITED",
            )
            assert error.retry_seconds is not None
    finally:
        await stop_api(api)


# --- password reset ----------------------------------------------------------------------------


async def test_reset_with_a_known_email_ends_every_session(mail_api: Api, smtpd: Smtpd) -> None:
    api = mail_api
    email = api.unique_email("forgot")
    await api.register(email)
    sessions = [await api.login(email) for _ in range(3)]
    await api.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=email))
    (message,) = await wait_for(smtpd.read, email, "password_reset")
    link = link_of(message)
    assert link.startswith("https://referrals.example/reset-password#token=")
    assert "30 minutes" in text_of(message)
    token = token_of(message)
    # The policy applies (and a refusal does not use the token up).
    error = await expect_error(
        api.auth.ResetPassword(auth_pb2.ResetPasswordRequest(token=token, new_password="password")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "VALIDATION_FAILED",
    )
    assert "new_password" in error.fields
    response = await api.auth.ResetPassword(
        auth_pb2.ResetPasswordRequest(token=token, new_password=NEW_PASSWORD)
    )
    assert response.sessions_revoked == 3
    for pair in sessions:
        await expect_error(
            api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(pair.access_token)),
            grpc.StatusCode.UNAUTHENTICATED,
            "TOKEN_REVOKED",
        )
        await expect_error(
            api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=pair.refresh_token)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    await expect_error(api.login(email), grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    user = await me(api, email, NEW_PASSWORD)
    assert user.is_verified  # the link proved the mailbox
    # Single use; a notice tells the owner.
    await expect_error(
        api.auth.ResetPassword(
            auth_pb2.ResetPasswordRequest(token=token, new_password="yet another passphrase 7")
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EMAIL_TOKEN_USED",
    )
    (notice,) = await wait_for(smtpd.read, email, "password_changed")
    assert "token=" not in text_of(notice)


async def test_reset_with_an_unknown_email_answers_the_same_and_sends_nothing(
    mail_api: Api, smtpd: Smtpd
) -> None:
    api = mail_api
    known, unknown = api.unique_email("known"), api.unique_email("unknown")
    await api.register(known)
    answers = []
    for address in (known, unknown):
        answers.append(
            await api.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=address))
        )
    assert answers[0] == answers[1] == auth_pb2.RequestPasswordResetResponse()
    await wait_for(smtpd.read, known, "password_reset")
    await _drained(api)
    assert not [m for m in smtpd.read() if m["To"] == unknown]
    await expect_error(
        api.auth.ResetPassword(auth_pb2.ResetPasswordRequest(token="z" * 43, new_password=NEW_PASSWORD)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "EMAIL_TOKEN_INVALID",
    )


async def test_an_expired_reset_link_changes_nothing(stack: Stack, smtpd: Smtpd) -> None:
    api = await start_api(stack, **smtp_settings(smtpd))
    try:
        email = api.unique_email("slow")
        await api.register(email)
        pair = await api.login(email)
        await api.auth.RequestPasswordReset(auth_pb2.RequestPasswordResetRequest(email=email))
        (message,) = await wait_for(smtpd.read, email, "password_reset")
        await api.app.store.transact(lambda uow: _age_tokens(uow, timedelta(minutes=31)))
        await expect_error(
            api.auth.ResetPassword(
                auth_pb2.ResetPasswordRequest(token=token_of(message), new_password=NEW_PASSWORD)
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "EMAIL_TOKEN_EXPIRED",
        )
        await api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(pair.access_token))
        await me(api, email)  # the old password still works
    finally:
        await stop_api(api)


async def test_change_password_sends_a_notice(mail_api: Api, smtpd: Smtpd) -> None:
    api = mail_api
    email = api.unique_email("changer")
    await api.register(email)
    tokens = await api.login(email)
    await api.auth.ChangePassword(
        auth_pb2.ChangePasswordRequest(current_password=PASSWORD, new_password=NEW_PASSWORD),
        metadata=bearer(tokens.access_token),
    )
    (notice,) = await wait_for(smtpd.read, email, "password_changed")
    assert email in text_of(notice)


# --- delivery ----------------------------------------------------------------------------------


async def test_smtp_down_during_registration_then_back_the_mail_arrives_once(stack: Stack) -> None:
    down = Smtpd()
    port = down.start()
    down.stop()  # a port nobody listens on now
    api = await start_api(stack, **smtp_settings(down))
    try:
        email = api.unique_email("patient")
        user = await api.register(email)  # registration does not wait for, or fail with, the mail
        assert user.id
        await _attempted(api, at_least=2)
        back = Smtpd(port)
        back.start()
        try:
            (message,) = await wait_for(back.read, email, "verify_email")
            await _drained(api)
            await asyncio.sleep(0.5)  # several poll intervals: nothing is sent again
            assert len([m for m in back.read() if m["To"] == email]) == 1
            assert (await api.auth.VerifyEmail(verify_token(token_of(message)))).user.is_verified
        finally:
            back.stop()
    finally:
        await stop_api(api)


async def _attempted(api: Api, at_least: int, attempts: int = 600) -> None:
    from sqlalchemy import func, select

    from referral_service.storage.core import MAILS

    for _ in range(attempts):
        async with api.app.store.read() as uow:
            tries = (await uow.connection.execute(select(func.max(MAILS.c.attempts)))).scalar_one()  # type: ignore[attr-defined]
        if (tries or 0) >= at_least:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the mail was not attempted")


async def test_a_queued_message_survives_a_restart_and_is_sent_once(stack: Stack, smtpd: Smtpd) -> None:
    """The first server stops with the message still queued (SMTP down); the next one, on the
    same database, sends it once."""
    down = Smtpd()
    down.start()
    down.stop()
    first = await start_api(stack, **smtp_settings(down))
    email = first.unique_email("restart")
    try:
        await first.register(email)
        await _attempted(first, at_least=1)
    finally:
        await stop_api(first)
    second = await start_api(stack, **smtp_settings(smtpd))
    try:
        await wait_for(smtpd.read, email, "verify_email")
        await _drained(second)
        await asyncio.sleep(0.5)
        assert len([m for m in smtpd.read() if m["To"] == email]) == 1
    finally:
        await stop_api(second)


async def test_a_refused_recipient_is_not_retried(mail_api: Api, smtpd: Smtpd) -> None:
    api = mail_api
    smtpd.refuse_with = "550 5.1.1 no such mailbox"
    email = api.unique_email("bounce")
    await api.register(email)
    await _drained(api)
    from sqlalchemy import select

    from referral_service.storage.core import MAILS

    async with api.app.store.read() as uow:
        state, attempts, error = (
            await uow.connection.execute(  # type: ignore[attr-defined]
                select(MAILS.c.state, MAILS.c.attempts, MAILS.c.last_error).where(MAILS.c.email_key == email)
            )
        ).one()
    assert (state, attempts) == ("failed", 1)
    assert "550" in error


@pytest.mark.sqlite_stack
async def test_smtp_credentials_are_used(stack: Stack) -> None:
    smtpd = Smtpd(auth=("mailer", "p@ss word"))
    smtpd.start()
    api = await start_api(
        stack,
        **smtp_settings(smtpd, smtp_url=f"smtp://mailer:p%40ss%20word@127.0.0.1:{smtpd.port}?starttls=off"),
    )
    try:
        email = api.unique_email("auth")
        await api.register(email)
        await wait_for(smtpd.read, email, "verify_email")
        assert smtpd.logins == ["mailer"]
    finally:
        await stop_api(api)
        smtpd.stop()


@pytest.mark.sqlite_stack
async def test_without_smtp_messages_land_in_the_local_mail_directory(api: Api) -> None:
    email = api.unique_email("local")
    await api.register(email)
    user = await api.verify(email)  # read from <data dir>/mail/new
    assert user.is_verified
    assert api.mail_dir == api.stack.data_dir / "mail"
    assert (api.mail_dir / "new").stat().st_mode & 0o077 == 0


# --- profile data only for verified owners -------------------------------------------------------


async def test_get_user_shows_deliverability_and_verification_apart(mail_api: Api, smtpd: Smtpd) -> None:
    api = mail_api
    email = api.unique_email("fields")
    user = await api.register(email)
    assert user.email_deliverability == auth_pb2.User.EMAIL_VERIFICATION_UNSPECIFIED  # Hunter off
    (message,) = await wait_for(smtpd.read, email, "verify_email")
    verified = (await api.auth.VerifyEmail(verify_token(token_of(message)))).user
    assert verified.verify_time.ToDatetime() >= verified.create_time.ToDatetime()


@pytest.mark.sqlite_stack
async def test_guessing_tokens_and_codes_is_limited_per_address(stack: Stack, smtpd: Smtpd) -> None:
    api = await start_api(
        stack,
        **smtp_settings(
            smtpd, rate_limit_verify_email_address="3/1h", rate_limit_password_reset_confirm_address="2/1h"
        ),
    )
    try:
        email = api.unique_email("guessed")
        await api.register(email)
        (message,) = await wait_for(smtpd.read, email, "verify_email")
        for guess in ("000000", "111111", "222222"):
            await expect_error(
                api.auth.VerifyEmail(auth_pb2.VerifyEmailRequest(email=email, code=guess)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "EMAIL_TOKEN_INVALID",
            )
        # Even the right link is refused now, from this address: the guesser is stopped.
        error = await expect_error(
            api.auth.VerifyEmail(verify_token(token_of(message))),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
        )
        assert error.retry_seconds is not None
        for _ in range(2):
            await expect_error(
                api.auth.ResetPassword(
                    auth_pb2.ResetPasswordRequest(token="q" * 43, new_password=NEW_PASSWORD)
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "EMAIL_TOKEN_INVALID",
            )
        await expect_error(
            api.auth.ResetPassword(auth_pb2.ResetPasswordRequest(token="q" * 43, new_password=NEW_PASSWORD)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
        )
    finally:
        await stop_api(api)
