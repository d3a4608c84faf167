"""Abuse at registration (disposable email domains) and secrets in logs: a full run's logs and
error messages are searched for every password, token and key used in it."""

from __future__ import annotations

import logging

import grpc
import pytest
from referral.v1 import auth_pb2, referral_pb2

from referral_service.logs import JsonFormatter, TextFormatter
from tests.conftest import PASSWORD, TEST_SECRET, Api, Stack, bearer, start_api, stop_api
from tests.errors import expect_error
from tests.proxy import Proxy

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("email", ["someone@mailinator.com", "x@sub.mailinator.com", "Y@GuerrillaMail.com"])
async def test_disposable_email_domains_are_refused(api: Api, email: str) -> None:
    error = await expect_error(
        api.auth.Register(auth_pb2.RegisterRequest(email=email, password=PASSWORD)),
        INVALID,
        "EMAIL_DISPOSABLE",
    )
    assert error.field_reasons["email"] == "DISPOSABLE_DOMAIN"


async def test_the_disposable_list_is_configurable(stack: Stack) -> None:
    api = await start_api(
        stack, disposable_domains_extra=["throwaway.example"], disposable_domains_allowed=["mailinator.com"]
    )
    try:
        await api.register("kept@mailinator.com")
        await expect_error(api.register("a@throwaway.example"), INVALID, "EMAIL_DISPOSABLE")
    finally:
        await stop_api(api)
    off = await start_api(stack, reject_disposable_emails=False)
    try:
        await off.register("anyone@mailinator.com")
    finally:
        await stop_api(off)


async def test_no_secret_reaches_the_logs_or_an_error_message(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    redis_password = "redis-password-do-not-log-4711"
    proxy = await Proxy("127.0.0.1", 9).start()
    proxy.refuse()  # Redis down: the outage is logged, its URL's password must not be
    secrets: list[str] = [PASSWORD, TEST_SECRET, redis_password]
    messages: list[str] = []

    async def failing(call: object) -> None:
        try:
            await call  # type: ignore[misc]
        except grpc.aio.AioRpcError as error:
            messages.append(f"{error.details()} {error.debug_error_string()}")

    with caplog.at_level(logging.DEBUG):
        api = await start_api(
            stack,
            redis_url=f"redis://:{redis_password}@127.0.0.1:{proxy.port}/0",
            rate_limit_login_account="3/1h",
            log_level="DEBUG",
        )
        try:
            email = api.unique_email()
            wrong = "wrong-password-do-not-log-1"
            secrets.append(wrong)
            await api.register(email)
            tokens = await api.login(email)
            refreshed = await api.auth.RefreshToken(
                auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token)
            )
            secrets += [
                tokens.access_token,
                tokens.refresh_token,
                refreshed.access_token,
                refreshed.refresh_token,
            ]
            secrets += [token.split(".")[2] for token in secrets[-4:]]  # the signatures alone
            await failing(
                api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token))
            )
            await failing(
                api.auth.GetCurrentUser(
                    auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token)
                )
            )
            for _ in range(4):
                await failing(api.login(email, wrong))
            await failing(api.auth.Register(auth_pb2.RegisterRequest(email=email, password=PASSWORD)))
            await failing(
                api.auth.Register(auth_pb2.RegisterRequest(email="short@example.com", password="pw-1"))
            )
            secrets.append("pw-1")
            await failing(
                api.auth.Register(auth_pb2.RegisterRequest(email="x@mailinator.com", password=PASSWORD))
            )
            other = api.unique_email()
            await api.register(other)
            session = await api.login(other)
            secrets += [session.access_token, session.refresh_token]
            await api.referral.CreateReferralCode(
                referral_pb2.CreateReferralCodeRequest(code="SECRETCODE", ttl={"seconds": 3600}),
                metadata=bearer(session.access_token),
            )
            await api.auth.Logout(
                auth_pb2.LogoutRequest(refresh_token=session.refresh_token),
                metadata=bearer(session.access_token),
            )
            await failing(
                api.auth.GetCurrentUser(
                    auth_pb2.GetCurrentUserRequest(), metadata=bearer(session.access_token)
                )
            )
            await failing(
                api.auth.GetCurrentUser(
                    auth_pb2.GetCurrentUserRequest(), metadata=bearer(session.access_token + "x")
                )
            )
        finally:
            await stop_api(api)
            await proxy.close()
    assert any(record.name == "referral_service.access" for record in caplog.records)
    assert any("redis" in record.getMessage() for record in caplog.records)  # the outage was logged
    outputs = [caplog.text, *messages]
    for formatter in (JsonFormatter(), TextFormatter()):
        outputs += [formatter.format(record) for record in caplog.records]
    text = "\n".join(outputs)
    for secret in secrets:
        assert secret not in text, f"a secret leaked: {secret[:12]}..."
