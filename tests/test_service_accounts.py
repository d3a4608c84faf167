"""Internal services as first-class callers (issue 13), through the wire: service accounts and
their CLI, client-credentials tokens, scopes declared in the proto, services registering users
on their behalf with their own quota, GetUser, token introspection, revocation everywhere."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import httpx
import jwt
import pytest
from referral.v1 import auth_pb2, referral_pb2

from referral_service import cli
from referral_service.domain.clock import utcnow
from tests.conftest import PASSWORD, TEST_SECRET, Api, Stack, bearer, start_api, stop_api, token_claims
from tests.errors import expect_error

ALL_SCOPES = ["referrals:read", "tokens:introspect", "users:read", "users:register"]
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


async def service(api: Api, *scopes: str, name: str | None = None) -> tuple[str, str]:
    """A new service account: its client id and secret."""
    account, secret = await api.app.services.service_accounts.create(
        name or f"svc-{uuid.uuid4().hex[:8]}", list(scopes)
    )
    return account.client_id, secret


async def service_token(api: Api, *scopes: str) -> str:
    client_id, secret = await service(api, *scopes)
    response = await api.auth.IssueServiceToken(
        auth_pb2.IssueServiceTokenRequest(client_id=client_id, client_secret=secret)
    )
    return response.access_token


def as_service(token: str, end_user: str | None = None) -> tuple[tuple[str, str], ...]:
    metadata = bearer(token)
    return (*metadata, ("end-user-address", end_user)) if end_user else metadata


async def test_client_credentials_grant(api: Api) -> None:
    client_id, secret = await service(api, "users:read", "referrals:read")
    full = await api.auth.IssueServiceToken(
        auth_pb2.IssueServiceTokenRequest(client_id=client_id, client_secret=secret)
    )
    assert full.token_type == "Bearer"
    assert full.expires_in == 900
    assert full.scope == "referrals:read users:read"
    narrow = await api.auth.IssueServiceToken(
        auth_pb2.IssueServiceTokenRequest(client_id=client_id, client_secret=secret, scopes=["users:read"])
    )
    assert narrow.scope == "users:read"
    # A narrowed token has only what it asked for.
    await expect_error(
        api.referral.ListReferrals(
            referral_pb2.ListReferralsRequest(referrer_id=1), metadata=as_service(narrow.access_token)
        ),
        DENIED,
        "SCOPE_MISSING",
    )
    for scopes in (["tokens:introspect"], ["admin:everything"]):
        error = await expect_error(
            api.auth.IssueServiceToken(
                auth_pb2.IssueServiceTokenRequest(client_id=client_id, client_secret=secret, scopes=scopes)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_SCOPE",
        )
        assert list(error.fields) == ["scopes"]
    for wrong_id, wrong_secret in ((client_id, secret + "x"), ("svc_unknown", secret), (client_id, "")):
        await expect_error(
            api.auth.IssueServiceToken(
                auth_pb2.IssueServiceTokenRequest(client_id=wrong_id, client_secret=wrong_secret)
            ),
            grpc.StatusCode.INVALID_ARGUMENT if not wrong_secret else UNAUTH,
            None if not wrong_secret else "INVALID_CLIENT",
        )


async def test_a_service_token_is_not_a_user_token(api: Api) -> None:
    token = await service_token(api, *ALL_SCOPES)
    # It cannot be refreshed, and it never acts as a user.
    await expect_error(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=token)), UNAUTH, "TOKEN_INVALID"
    )
    await expect_error(
        api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=as_service(token)), DENIED
    )
    await expect_error(
        api.referral.CreateReferralCode(
            referral_pb2.CreateReferralCodeRequest(ttl={"seconds": 3600}), metadata=as_service(token)
        ),
        DENIED,
    )
    # A user token never carries a scope: service RPCs refuse it, naming the scope.
    _, user_token = await api.user_with_token()
    error = await expect_error(
        api.auth.GetUser(auth_pb2.GetUserRequest(user_id=1), metadata=bearer(user_token)),
        DENIED,
        "SCOPE_MISSING",
    )
    assert error.metadata["required_scope"] == "users:read"
    error = await expect_error(
        api.auth.IntrospectToken(
            auth_pb2.IntrospectTokenRequest(token=user_token), metadata=bearer(user_token)
        ),
        DENIED,
        "SCOPE_MISSING",
    )
    assert error.metadata["required_scope"] == "tokens:introspect"
    # A user token sent to Register (public, scoped) is refused rather than ignored.
    await expect_error(
        api.auth.Register(
            auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD), metadata=bearer(user_token)
        ),
        DENIED,
        "SCOPE_MISSING",
    )
    # No token at all on a service RPC.
    await expect_error(api.auth.GetUser(auth_pb2.GetUserRequest(user_id=1)), UNAUTH, "TOKEN_MISSING")


async def test_every_scope_is_checked(api: Api) -> None:
    referrer_email = api.unique_email()
    referrer = await api.register(referrer_email)
    tokens = {scope: await service_token(api, scope) for scope in ALL_SCOPES}
    calls = {
        "users:read": lambda md: api.auth.GetUser(auth_pb2.GetUserRequest(user_id=referrer.id), metadata=md),
        "referrals:read": lambda md: api.referral.ListReferrals(
            referral_pb2.ListReferralsRequest(referrer_id=referrer.id), metadata=md
        ),
        "tokens:introspect": lambda md: api.auth.IntrospectToken(
            auth_pb2.IntrospectTokenRequest(token="x.y.z"), metadata=md
        ),
        "users:register": lambda md: api.auth.Register(
            auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD), metadata=md
        ),
    }
    for needed, call in calls.items():
        for held, token in tokens.items():
            if held == needed:
                await call(as_service(token))
            else:
                error = await expect_error(call(as_service(token)), DENIED, "SCOPE_MISSING")
                assert error.metadata["required_scope"] == needed


async def test_get_user_by_id_or_email(api: Api) -> None:
    token = await service_token(api, "users:read")
    email = api.unique_email()
    user = await api.register(email)
    by_id = await api.auth.GetUser(auth_pb2.GetUserRequest(user_id=user.id), metadata=as_service(token))
    by_email = await api.auth.GetUser(
        auth_pb2.GetUserRequest(email=email.upper()), metadata=as_service(token)
    )
    assert by_id.user == by_email.user == user
    for request in (auth_pb2.GetUserRequest(), auth_pb2.GetUserRequest(user_id=user.id, email=email)):
        await expect_error(
            api.auth.GetUser(request, metadata=as_service(token)), grpc.StatusCode.INVALID_ARGUMENT
        )
    for request in (auth_pb2.GetUserRequest(user_id=10**12), auth_pb2.GetUserRequest(email="no@example.com")):
        await expect_error(
            api.auth.GetUser(request, metadata=as_service(token)), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND"
        )


async def test_a_service_lists_anyones_referrals(api: Api) -> None:
    referrer_email = api.unique_email()
    referrer, referrer_token = await api.user_with_token(referrer_email)
    code = await api.referral.CreateReferralCode(
        referral_pb2.CreateReferralCodeRequest(ttl={"seconds": 3600}), metadata=bearer(referrer_token)
    )
    await api.register(referral_code=code.referral_code.code)
    token = await service_token(api, "referrals:read")
    page = await api.referral.ListReferrals(
        referral_pb2.ListReferralsRequest(referrer_id=referrer.id), metadata=as_service(token)
    )
    assert page.total_size == 1
    # Users still list only their own.
    _, other_token = await api.user_with_token()
    await expect_error(
        api.referral.ListReferrals(
            referral_pb2.ListReferralsRequest(referrer_id=referrer.id), metadata=bearer(other_token)
        ),
        DENIED,
    )


def forged(claims: dict[str, object], typ: str = "at+jwt", secret: str = TEST_SECRET) -> str:
    from referral_service.crypto.jwt import hmac_kid

    return jwt.encode(
        claims, secret, algorithm="HS256", headers={"typ": typ, "kid": hmac_kid(secret.encode())}
    )


async def test_introspection_of_live_expired_revoked_and_forged_tokens(api: Api) -> None:
    introspector = await service_token(api, "tokens:introspect")

    async def introspect(token: str) -> auth_pb2.IntrospectTokenResponse:
        return await api.auth.IntrospectToken(
            auth_pb2.IntrospectTokenRequest(token=token), metadata=as_service(introspector)
        )

    email = api.unique_email()
    user = await api.register(email)
    tokens = await api.login(email)
    live = await introspect(tokens.access_token)
    assert live.active
    assert live.token_type == auth_pb2.IntrospectTokenResponse.TOKEN_TYPE_ACCESS_TOKEN
    assert (live.sub, live.user_id, live.scope) == (str(user.id), user.id, "")
    assert live.expire_time.seconds - live.issue_time.seconds == 900
    refresh = await introspect(tokens.refresh_token)
    assert refresh.active
    assert refresh.token_type == auth_pb2.IntrospectTokenResponse.TOKEN_TYPE_REFRESH_TOKEN
    # A used refresh token is no longer active; the new one is.
    rotated = await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token))
    assert not (await introspect(tokens.refresh_token)).active
    assert (await introspect(rotated.refresh_token)).active
    # After logout, the user's tokens are inactive.
    await api.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(rotated.access_token))
    for token in (rotated.access_token, rotated.refresh_token, tokens.access_token):
        assert await introspect(token) == auth_pb2.IntrospectTokenResponse(active=False)
    # Expired, forged, garbage: inactive, never an error.
    expired = forged(token_claims(user.id, iat=1_000_000, nbf=1_000_000, exp=1_000_600))
    other_key = forged(token_claims(user.id), secret="another secret, 32 bytes or more!!")
    for dead in (expired, other_key, "not-a-token", "a.b.c"):
        assert await introspect(dead) == auth_pb2.IntrospectTokenResponse(active=False)
    # A service token, then its account revoked.
    client_id, secret = await service(api, "users:read", name="introspected")
    svc = await api.auth.IssueServiceToken(
        auth_pb2.IssueServiceTokenRequest(client_id=client_id, client_secret=secret)
    )
    found = await introspect(svc.access_token)
    assert found.active
    assert found.token_type == auth_pb2.IntrospectTokenResponse.TOKEN_TYPE_SERVICE_TOKEN
    assert (found.sub, found.client_id, found.scope, found.user_id) == (client_id, client_id, "users:read", 0)
    await api.app.services.service_accounts.revoke("introspected")
    assert not (await introspect(svc.access_token)).active
    await expect_error(
        api.auth.IntrospectToken(
            auth_pb2.IntrospectTokenRequest(token=""), metadata=as_service(introspector)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_an_expired_service_token_is_refused(api: Api) -> None:
    account, _ = await api.app.services.service_accounts.create("expiring", ["users:read"])
    old = api.app.services.tokens.issue_service(account, ["users:read"], utcnow() - timedelta(hours=1))
    await expect_error(
        api.auth.GetUser(auth_pb2.GetUserRequest(user_id=1), metadata=as_service(old.token)),
        UNAUTH,
        "TOKEN_EXPIRED",
    )


@pytest.mark.redis_stacks
async def test_revoking_a_service_account_ends_its_tokens_on_every_replica(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    one, two = await start_api(stack), await start_api(stack)
    try:
        monkeypatch.setenv("REFERRAL_DATABASE_URL", stack.database_url)
        monkeypatch.setenv("REFERRAL_DATA_DIR", str(stack.data_dir))
        monkeypatch.setenv("REFERRAL_REDIS_URL", stack.redis_url or "")
        monkeypatch.setenv("REFERRAL_REDIS_KEY_PREFIX", stack.redis_prefix)
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))

        async def run(*argv: str) -> int:
            return await asyncio.to_thread(cli.main, list(argv))

        assert await run("create-service-account", "billing", "--scope", "users:read", "--json") == 0
        created = json.loads(capsys.readouterr().out)
        assert sorted(created) == ["client_id", "client_secret"]
        assert await run("list-service-accounts", "--json") == 0
        (listed,) = json.loads(capsys.readouterr().out)
        assert (listed["name"], listed["client_id"], listed["scopes"], listed["revoke_time"]) == (
            "billing",
            created["client_id"],
            ["users:read"],
            None,
        )
        assert "secret" not in json.dumps(listed)
        assert await run("create-service-account", "billing", "--scope", "users:read") == 1
        assert "exists" in capsys.readouterr().err
        assert await run("create-service-account", "other", "--scope", "admin:all") == 1
        assert "admin:all" in capsys.readouterr().err

        request = auth_pb2.IssueServiceTokenRequest(
            client_id=created["client_id"], client_secret=created["client_secret"]
        )
        token = (await one.auth.IssueServiceToken(request)).access_token
        user = await one.register()
        for api in (one, two):
            await api.auth.GetUser(auth_pb2.GetUserRequest(user_id=user.id), metadata=as_service(token))

        assert await run("revoke-service-account", "billing") == 0
        assert "revoked" in capsys.readouterr().out
        for api in (one, two):
            await expect_error(
                api.auth.GetUser(auth_pb2.GetUserRequest(user_id=user.id), metadata=as_service(token)),
                UNAUTH,
                "TOKEN_REVOKED",
            )
            await expect_error(api.auth.IssueServiceToken(request), UNAUTH, "INVALID_CLIENT")
        assert await run("revoke-service-account", "nobody") == 1
    finally:
        await stop_api(one)
        await stop_api(two)


@pytest.fixture
async def strict(stack: Stack) -> AsyncIterator[Api]:
    """Anonymous registrations are limited to 20 an hour per address, as by default."""
    api = await start_api(stack, rate_limit_register_address="20/1h", rate_limit_register_service="1000/1m")
    try:
        yield api
    finally:
        await stop_api(api)


async def test_a_service_registers_300_users_in_a_minute_from_one_address(strict: Api) -> None:
    api = strict
    token = await service_token(api, "users:register")

    async def register(n: int) -> None:
        await api.auth.Register(
            auth_pb2.RegisterRequest(email=api.unique_email(f"svc{n}"), password=PASSWORD),
            metadata=as_service(token, end_user=f"198.51.{n // 250}.{n % 250 + 1}"),
        )

    for start in range(0, 300, 20):
        await asyncio.gather(*(register(n) for n in range(start, start + 20)))
    # An anonymous caller from the same address is still limited.
    for _ in range(20):
        await api.register()
    await expect_error(api.register(), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    # The service still is not.
    await register(300)


async def test_a_forwarded_end_user_address_counts_and_only_from_services(strict: Api) -> None:
    api = strict
    token = await service_token(api, "users:register")

    def register(metadata: tuple[tuple[str, str], ...]) -> object:
        return api.auth.Register(
            auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD), metadata=metadata
        )

    # Each end user's address has the anonymous budget: a service relaying one abusive user
    # does not let them through, and other users are not affected.
    for _ in range(20):
        await register(as_service(token, end_user="203.0.113.5"))
    error = await expect_error(
        register(as_service(token, end_user="203.0.113.5")), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert error.metadata["quota_limit"] == "register-address"
    await register(as_service(token, end_user="203.0.113.6"))
    await register(as_service(token, end_user="2001:db8::1"))
    bad = await expect_error(
        register(as_service(token, end_user="not-an-ip")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert list(bad.fields) == ["end-user-address"]
    # From anyone else the metadata is ignored: the caller's own address counts.
    for n in range(20):
        await register((("end-user-address", f"192.0.2.{n + 1}"),))
    await expect_error(register((("end-user-address", "192.0.2.200"),)), grpc.StatusCode.RESOURCE_EXHAUSTED)


async def test_the_service_quota_is_per_account_and_configurable(stack: Stack) -> None:
    api = await start_api(stack, rate_limit_register_service="3/1h", rate_limit_service_rates={"big": "5/1h"})
    try:
        small = await service_token(api, "users:register")
        big_id, big_secret = await service(api, "users:register", name="big")
        big = (
            await api.auth.IssueServiceToken(
                auth_pb2.IssueServiceTokenRequest(client_id=big_id, client_secret=big_secret)
            )
        ).access_token
        for token, allowed in ((small, 3), (big, 5)):
            for _ in range(allowed):
                await api.auth.Register(
                    auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD),
                    metadata=as_service(token),
                )
            error = await expect_error(
                api.auth.Register(
                    auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD),
                    metadata=as_service(token),
                ),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            assert error.metadata["quota_limit"] == "register-service"
            assert error.metadata["quota_subject"] == "service_account"
            assert error.metadata["quota_limit_value"] == str(allowed)
    finally:
        await stop_api(api)


@pytest.mark.one_stack
async def test_service_tokens_over_http(api: Api) -> None:
    client_id, secret = await service(api, "users:read")
    email = api.unique_email()
    user = await api.register(email)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.app.http_port}") as http:
        response = await http.post(
            "/v1/auth/service-token", json={"clientId": client_id, "clientSecret": secret}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["tokenType"], body["scope"]) == ("Bearer", "users:read")
        found = await http.get(
            "/v1/users:lookup",
            params={"email": email},
            headers={"Authorization": f"Bearer {body['accessToken']}"},
        )
        assert found.status_code == 200, found.text
        assert found.json()["user"]["id"] == str(user.id)
        denied = await http.post(
            "/v1/auth/introspect",
            json={"token": "x"},
            headers={"Authorization": f"Bearer {body['accessToken']}"},
        )
        assert denied.status_code == 403
        assert denied.json()["error"]["details"][0]["reason"] == "SCOPE_MISSING"
