"""AuthService through the wire: register, login, refresh, logout, current user, token checks."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import jwt
import pytest
from referral.v1 import auth_pb2
from sqlalchemy import select

from referral_service.crypto.jwt import hmac_kid
from referral_service.storage.tables import UserRow
from tests.conftest import PASSWORD, TEST_SECRET, Api, bearer, start_api, stop_api, token_claims
from tests.errors import expect_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


# --- register ------------------------------------------------------------------------------------


async def test_register_returns_the_new_user(api: Api) -> None:
    before = datetime.now(UTC)
    user = await api.register("  Alice.Smith@Example.COM ")
    assert user.id > 0
    assert user.email == "Alice.Smith@example.com"  # trimmed, domain lower-cased, local part kept
    assert user.is_active
    assert not user.is_verified
    assert not user.is_superuser
    assert not user.HasField("referrer_id")
    created = user.create_time.ToDatetime(tzinfo=UTC)
    assert before - timedelta(seconds=5) <= created <= datetime.now(UTC) + timedelta(seconds=5)


async def test_register_ignores_privileged_fields_a_client_smuggles_in(api: Api) -> None:
    """The predecessor stored is_superuser/is_active/is_verified as sent. Our request has no
    such fields; unknown fields on the wire (as an old or hostile client might send) are
    ignored."""
    email = api.unique_email()
    payload = auth_pb2.RegisterRequest(email=email, password=PASSWORD).SerializeToString()
    # field 7 (varint 1) and field 100 (varint 1): "is_superuser = true" in some other schema
    payload += bytes([7 << 3, 1]) + bytes([0xA0, 0x06, 1])
    call = api.channel.unary_unary(
        "/referral.v1.AuthService/Register",
        request_serializer=lambda raw: raw,
        response_deserializer=auth_pb2.RegisterResponse.FromString,
    )
    response = await call(payload)
    assert not response.user.is_superuser
    assert not response.user.is_verified


@pytest.mark.parametrize(
    ("email", "field_reason"),
    [
        ("", "REQUIRED"),
        ("   ", "REQUIRED"),
        ("not-an-email", "INVALID_EMAIL"),
        ("alice@@example.com", "INVALID_EMAIL"),
        ("alice@localhost", "INVALID_EMAIL"),
        ("alice@example.com\x00", "INVALID_EMAIL"),
        ("'; DROP TABLE users; --@example.com", "INVALID_EMAIL"),
        ("a" * 250 + "@example.com", "TOO_LONG"),
        ("a" * 65 + "@example.com", "INVALID_EMAIL"),
    ],
)
async def test_register_rejects_bad_emails(api: Api, email: str, field_reason: str) -> None:
    error = await expect_error(
        api.auth.Register(auth_pb2.RegisterRequest(email=email, password=PASSWORD)),
        INVALID,
        "VALIDATION_FAILED",
    )
    assert "email" in error.fields
    assert error.field_reasons["email"] == field_reason


@pytest.mark.parametrize(
    ("password", "field_reason"),
    [
        ("", "REQUIRED"),
        ("short", "TOO_SHORT"),
        ("1234567", "TOO_SHORT"),
        ("password", "COMMON_PASSWORD"),
        ("12345678", "COMMON_PASSWORD"),
        ("PASSWORD1", "COMMON_PASSWORD"),
        ("x" * 129, "TOO_LONG"),
        ("tab\tinside!", "INVALID_CHARACTERS"),
    ],
)
async def test_register_enforces_the_password_policy(api: Api, password: str, field_reason: str) -> None:
    error = await expect_error(
        api.auth.Register(auth_pb2.RegisterRequest(email=api.unique_email(), password=password)),
        INVALID,
        "VALIDATION_FAILED",
    )
    assert error.field_reasons["password"] == field_reason


async def test_register_refuses_the_email_as_password(api: Api) -> None:
    error = await expect_error(
        api.auth.Register(
            auth_pb2.RegisterRequest(email="bob.builder@example.com", password="bob.builder@example.com")
        ),
        INVALID,
    )
    assert error.field_reasons["password"] == "CONTEXT_SPECIFIC"


async def test_register_reports_every_bad_field_at_once(api: Api) -> None:
    error = await expect_error(
        api.auth.Register(auth_pb2.RegisterRequest(email="nope", password="x", request_id="not-a-uuid")),
        INVALID,
        "VALIDATION_FAILED",
    )
    assert set(error.fields) == {"email", "password", "request_id"}


@pytest.mark.parametrize("password", ["x" * 128, "日本語のパスフレーズです", "ñandú 🦤 correcto"])
async def test_long_and_unicode_passwords_work_untruncated(api: Api, password: str) -> None:
    email = api.unique_email()
    await api.register(email, password)
    await api.login(email, password)
    if len(password) == 128:
        # no truncation: a prefix of the password is not the password
        await expect_error(api.login(email, password[:-1]), UNAUTH, "INVALID_CREDENTIALS")


async def test_password_is_nfkc_normalised(api: Api) -> None:
    email = api.unique_email()
    await api.register(email, "ｆｕｌｌｗｉｄｔｈ pass")  # fullwidth letters
    await api.login(email, "fullwidth pass")


async def test_duplicate_email_is_already_exists_whatever_the_case(api: Api) -> None:
    await api.register("alice@example.com")
    for variant in ("alice@example.com", "Alice@Example.com", " ALICE@EXAMPLE.COM "):
        error = await expect_error(
            api.auth.Register(auth_pb2.RegisterRequest(email=variant, password=PASSWORD)),
            grpc.StatusCode.ALREADY_EXISTS,
            "EMAIL_ALREADY_REGISTERED",
        )
        assert "email" in error.fields
    # the original user is not locked out, whichever case they type
    await api.login("ALICE@example.com")
    await api.login("alice@EXAMPLE.com")


async def test_concurrent_registrations_of_one_email_create_exactly_one_user(api: Api) -> None:
    email = api.unique_email()
    results = await asyncio.gather(
        *(api.auth.Register(auth_pb2.RegisterRequest(email=email, password=PASSWORD)) for _ in range(8)),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, auth_pb2.RegisterResponse)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1
    assert len(failed) == 7
    assert {f.code() for f in failed} == {grpc.StatusCode.ALREADY_EXISTS}
    async with api.app.db.read() as session:
        rows = (await session.execute(select(UserRow).where(UserRow.email_key == email.lower()))).all()
    assert len(rows) == 1


async def test_register_retry_with_request_id_returns_the_first_user(api: Api) -> None:
    request_id = str(uuid.uuid4())
    email = api.unique_email()
    first = await api.register(email, request_id=request_id)
    again = await api.register(email, request_id=request_id)
    assert again.id == first.id
    await expect_error(
        api.auth.Register(
            auth_pb2.RegisterRequest(email=api.unique_email(), password=PASSWORD, request_id=request_id)
        ),
        INVALID,
        "REQUEST_ID_CONFLICT",
    )


async def test_concurrent_retries_with_one_request_id_all_get_the_same_user(api: Api) -> None:
    request_id = str(uuid.uuid4())
    email = api.unique_email()
    results = await asyncio.gather(*(api.register(email, request_id=request_id) for _ in range(5)))
    assert len({user.id for user in results}) == 1


# --- login ---------------------------------------------------------------------------------------


def _header(token: str) -> dict[str, str]:
    return jwt.get_unverified_header(token)


async def test_login_returns_an_oauth2_token_response(api: Api) -> None:
    email = api.unique_email()
    user = await api.register(email)
    tokens = await api.login(email)
    assert tokens.token_type == "Bearer"
    assert tokens.expires_in == 15 * 60
    assert tokens.refresh_expires_in == 30 * 24 * 3600
    assert tokens.access_token != tokens.refresh_token
    header = _header(tokens.access_token)
    assert header["alg"] == "HS256"
    assert header["typ"] == "at+jwt"
    assert header["kid"]
    claims = jwt.decode(tokens.access_token, options={"verify_signature": False})
    assert claims["sub"] == str(user.id)
    assert claims["iss"] == "referral-service"
    assert claims["aud"] == "referral-service"
    assert claims["exp"] - claims["iat"] == 15 * 60
    assert "is_superuser" not in claims
    assert "password" not in json.dumps(claims)


async def test_login_failures_do_not_reveal_whether_the_email_exists(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    wrong_password = await expect_error(api.login(email, "wrong password!!"), UNAUTH, "INVALID_CREDENTIALS")
    unknown_email = await expect_error(
        api.login("nobody@example.com", PASSWORD), UNAUTH, "INVALID_CREDENTIALS"
    )
    malformed_email = await expect_error(api.login("not an email", PASSWORD), UNAUTH, "INVALID_CREDENTIALS")
    assert wrong_password.message == unknown_email.message == malformed_email.message


async def test_login_requires_both_fields(api: Api) -> None:
    error = await expect_error(api.auth.Login(auth_pb2.LoginRequest()), INVALID, "VALIDATION_FAILED")
    assert set(error.fields) == {"email", "password"}


async def test_login_rehashes_when_argon2_parameters_change(stack) -> None:  # type: ignore[no-untyped-def]
    first = await start_api(stack)
    try:
        email = first.unique_email()
        await first.register(email)
    finally:
        await stop_api(first)
    second = await start_api(stack, argon2_time_cost=3)
    try:
        await second.login(email)
        async with second.app.db.read() as session:
            row = (await session.execute(select(UserRow).where(UserRow.email_key == email))).scalar_one()
        assert row.password_hash.startswith("$argon2id$v=19$m=19456,t=3,p=1$")
        await second.login(email)  # the new hash verifies
    finally:
        await stop_api(second)


# --- tokens and the interceptor -----------------------------------------------------------------------


async def test_get_current_user_with_a_valid_token(api: Api) -> None:
    user, token = await api.user_with_token()
    response = await api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(token))
    assert response.user == user


async def test_missing_token_is_unauthenticated(api: Api) -> None:
    error = await expect_error(
        api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest()), UNAUTH, "TOKEN_MISSING"
    )
    assert "Bearer" in error.message


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "token-without-scheme"])
async def test_malformed_authorization_is_unauthenticated(api: Api, header: str) -> None:
    await expect_error(
        api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=(("authorization", header),)),
        UNAUTH,
        "TOKEN_INVALID",
    )


TEST_KID = hmac_kid(TEST_SECRET.encode())


def _forge(claims: dict[str, object], key: str = TEST_SECRET, **headers: object) -> str:
    return jwt.encode(claims, key, algorithm="HS256", headers={"typ": "at+jwt", "kid": TEST_KID, **headers})


_claims = token_claims


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_a_correctly_forged_token_is_accepted_so_the_attack_tests_are_meaningful(
    api: Api,
) -> None:
    user, _ = await api.user_with_token()
    response = await api.auth.GetCurrentUser(
        auth_pb2.GetCurrentUserRequest(), metadata=bearer(_forge(_claims(user.id)))
    )
    assert response.user.id == user.id


async def test_token_attacks_are_rejected(api: Api) -> None:
    user, token = await api.user_with_token()
    uid = user.id
    tampered_payload = token.split(".")
    tampered_payload[1] = _b64(
        {**jwt.decode(token, options={"verify_signature": False}), "sub": str(uid + 1)}
    )
    header, payload, signature = token.split(".")
    attacks = {
        "tampered payload": ".".join(tampered_payload),
        "tampered signature": f"{header}.{payload}.{signature[:-4]}AAAA",
        "alg none": f"{_b64({'alg': 'none', 'typ': 'at+jwt'})}.{payload}.",
        "alg none, no dot": f"{_b64({'alg': 'none', 'typ': 'at+jwt'})}.{payload}",
        "other secret": _forge(_claims(uid), key="another-secret-" + "y" * 40),
        "wrong audience": _forge(_claims(uid, aud="someone-else")),
        "wrong issuer": _forge(_claims(uid, iss="evil")),
        "not yet valid": _forge(_claims(uid, nbf=int(time.time()) + 3600)),
        "missing exp": _forge(_claims(uid, exp=None)),
        "missing jti": _forge(_claims(uid, jti=None)),
        "untyped": jwt.encode(_claims(uid), TEST_SECRET, algorithm="HS256", headers={"kid": TEST_KID}),
        "unknown kid": _forge(_claims(uid), kid="not-our-key"),
        "no kid": jwt.encode(_claims(uid), TEST_SECRET, algorithm="HS256", headers={"typ": "at+jwt"}),
        "HS512": jwt.encode(
            _claims(uid), TEST_SECRET, algorithm="HS512", headers={"typ": "at+jwt", "kid": TEST_KID}
        ),
        "garbage": "not.a.jwt",
        "huge": "a" * 5_000,
    }
    for name, forged in attacks.items():
        error = await expect_error(
            api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(forged)),
            UNAUTH,
        )
        assert error.reason == "TOKEN_INVALID", f"{name}: {error.reason}"


async def test_oversized_metadata_is_refused_by_grpc_itself(api: Api) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer("a" * 40_000))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_expired_token_is_token_expired(api: Api) -> None:
    user, _ = await api.user_with_token()
    past = int(time.time()) - 3600
    forged = _forge(_claims(user.id, iat=past - 600, nbf=past - 600, exp=past))
    await expect_error(
        api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(forged)),
        UNAUTH,
        "TOKEN_EXPIRED",
    )


async def test_a_refresh_token_is_never_an_access_token(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    tokens = await api.login(email)
    error = await expect_error(
        api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.refresh_token)),
        UNAUTH,
        "TOKEN_INVALID",
    )
    assert "not an access token" in error.message
    # ... nor is an access token a refresh token
    await expect_error(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=tokens.access_token)),
        UNAUTH,
        "TOKEN_INVALID",
    )


# --- refresh -------------------------------------------------------------------------------------------


async def test_refresh_rotates_and_reuse_revokes_the_family(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    first = await api.login(email)
    second = await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=first.refresh_token))
    assert second.token_type == "Bearer"
    assert second.refresh_token != first.refresh_token
    assert second.access_token != first.access_token
    await api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(second.access_token))

    # replaying the used refresh token: reuse detected, the whole family is revoked
    await expect_error(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=first.refresh_token)),
        UNAUTH,
        "REFRESH_TOKEN_REUSED",
    )
    await expect_error(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=second.refresh_token)),
        UNAUTH,
        "TOKEN_REVOKED",
    )
    for access in (first.access_token, second.access_token):
        await expect_error(
            api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(access)),
            UNAUTH,
            "TOKEN_REVOKED",
        )
    # other sessions of the same user are untouched; a new login works
    third = await api.login(email)
    await api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(third.access_token))


async def test_concurrent_refreshes_of_one_token_succeed_once(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    tokens = await api.login(email)
    results = await asyncio.gather(
        *(
            api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token))
            for _ in range(6)
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(r, auth_pb2.RefreshTokenResponse) for r in results) == 1
    assert all(r.code() == UNAUTH for r in results if isinstance(r, grpc.aio.AioRpcError))


async def test_refresh_requires_a_token(api: Api) -> None:
    error = await expect_error(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest()), INVALID, "VALIDATION_FAILED"
    )
    assert "refresh_token" in error.fields
    await expect_error(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token="garbage")),
        UNAUTH,
        "TOKEN_INVALID",
    )


# --- logout --------------------------------------------------------------------------------------------


@pytest.mark.all_stacks
async def test_logout_revokes_the_access_token_and_the_refresh_family(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    session = await api.login(email)
    other = await api.login(email)
    await api.auth.Logout(
        auth_pb2.LogoutRequest(refresh_token=session.refresh_token),
        metadata=bearer(session.access_token),
    )
    await expect_error(
        api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(session.access_token)),
        UNAUTH,
        "TOKEN_REVOKED",
    )
    await expect_error(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=session.refresh_token)),
        UNAUTH,
        "TOKEN_REVOKED",
    )
    await expect_error(
        api.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(session.access_token)),
        UNAUTH,
        "TOKEN_REVOKED",
    )
    # the user's other session still works
    await api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(other.access_token))
    await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=other.refresh_token))


@pytest.mark.all_stacks
async def test_logout_without_refresh_token_still_ends_the_session(api: Api) -> None:
    email = api.unique_email()
    await api.register(email)
    session = await api.login(email)
    await api.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(session.access_token))
    await expect_error(
        api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=session.refresh_token)),
        UNAUTH,
        "TOKEN_REVOKED",
    )


async def test_logout_refuses_another_users_refresh_token(api: Api) -> None:
    _, token = await api.user_with_token()
    victim = api.unique_email()
    await api.register(victim)
    victim_tokens = await api.login(victim)
    await expect_error(
        api.auth.Logout(
            auth_pb2.LogoutRequest(refresh_token=victim_tokens.refresh_token),
            metadata=bearer(token),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    await api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=victim_tokens.refresh_token))


@pytest.mark.all_stacks
async def test_revocation_survives_a_restart(stack) -> None:  # type: ignore[no-untyped-def]
    first = await start_api(stack)
    try:
        email = first.unique_email()
        await first.register(email)
        tokens = await first.login(email)
        await first.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(tokens.access_token))
    finally:
        await stop_api(first)
    if stack.redis_url:
        # Redis keeps nothing on disk here: a restart loses every key.
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(stack.redis_url)
        keys = [key async for key in client.scan_iter(match=f"{stack.redis_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    second = await start_api(stack)
    try:
        await expect_error(
            second.auth.GetCurrentUser(
                auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token)
            ),
            UNAUTH,
            "TOKEN_REVOKED",
        )
    finally:
        await stop_api(second)


@pytest.mark.all_stacks
async def test_two_replicas_share_revocations(stack) -> None:  # type: ignore[no-untyped-def]
    one = await start_api(stack)
    two = await start_api(stack)
    try:
        email = one.unique_email()
        await one.register(email)
        tokens = await one.login(email)
        await two.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token))
        await one.auth.Logout(auth_pb2.LogoutRequest(), metadata=bearer(tokens.access_token))
        await expect_error(
            two.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(tokens.access_token)),
            UNAUTH,
            "TOKEN_REVOKED",
        )
    finally:
        await stop_api(one)
        await stop_api(two)
