"""Token hardening: named keys (kid), rotation without logging anyone out, EdDSA/ES256 with the
public keys served as a JWKS, and the RFC 8725 attacks against the asymmetric setups (the HS256
ones are in test_auth.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from google.protobuf import json_format
from referral.v1 import auth_pb2

from tests.conftest import TEST_SECRET, Api, Stack, bearer, start_api, stop_api, token_claims
from tests.errors import expect_error

UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def new_key(algorithm: str) -> Any:
    return (
        ed25519.Ed25519PrivateKey.generate()
        if algorithm == "EdDSA"
        else ec.generate_private_key(ec.SECP256R1())
    )


def private_pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


claims = token_claims


def hs256_raw(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    """HS256 by hand: PyJWT itself refuses a PEM public key as an HMAC secret, an attacker
    does not."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


async def jwks(api: Api) -> dict[str, Any]:
    response = await api.auth.GetJwks(auth_pb2.GetJwksRequest())
    return json_format.MessageToDict(response, preserving_proto_field_name=True)


async def who(api: Api, token: str) -> auth_pb2.User:
    return (await api.auth.GetCurrentUser(auth_pb2.GetCurrentUserRequest(), metadata=bearer(token))).user


@pytest.fixture(params=["EdDSA", "ES256"])
async def asymmetric(stack: Stack, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Api, Any, str]]:
    key = new_key(request.param)
    api = await start_api(stack, jwt_algorithm=request.param, jwt_private_key=private_pem(key))
    try:
        yield api, key, request.param
    finally:
        await stop_api(api)


async def test_hs256_publishes_no_keys(api: Api) -> None:
    assert (await jwks(api)).get("keys", []) == []


async def test_asymmetric_tokens_verify_offline_with_the_jwks(asymmetric: tuple[Api, Any, str]) -> None:
    api, _key, algorithm = asymmetric
    user, token = await api.user_with_token()
    header = jwt.get_unverified_header(token)
    assert header["alg"] == algorithm
    document = await jwks(api)
    assert [k["kid"] for k in document["keys"]] == [header["kid"]]
    assert document["keys"][0]["use"] == "sig"
    assert all("d" not in k for k in document["keys"])  # never the private part
    # what an internal service in any language does: pick the key by kid, verify locally
    key = jwt.PyJWKSet.from_dict(document)[header["kid"]]
    verified = jwt.decode(token, key, algorithms=[algorithm], audience="referral-service")
    assert verified["sub"] == str(user.id)


async def test_rfc8725_attacks_on_asymmetric_tokens(asymmetric: tuple[Api, Any, str]) -> None:
    api, key, algorithm = asymmetric
    user, token = await api.user_with_token()
    uid = user.id
    kid = jwt.get_unverified_header(token)["kid"]

    def sign(payload: dict[str, Any], with_key: Any = key, **headers: Any) -> str:
        return jwt.encode(
            payload, with_key, algorithm=algorithm, headers={"typ": "at+jwt", "kid": kid, **headers}
        )

    # a token we sign like the server does is accepted: the attacks below are meaningful
    assert (await who(api, sign(claims(uid)))).id == uid
    public = public_pem(key)
    stranger = new_key(algorithm)
    header, payload, signature = token.split(".")
    raw_public = (
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if algorithm == "EdDSA"
        else public
    )
    attacks = {
        "HS256 signed with the public key (algorithm confusion)": hs256_raw(
            {"alg": "HS256", "typ": "at+jwt", "kid": kid}, claims(uid), public
        ),
        "HS256 signed with the raw public key": hs256_raw(
            {"alg": "HS256", "typ": "at+jwt", "kid": kid}, claims(uid), raw_public
        ),
        "HS256 with the server's HMAC secret": hs256_raw(
            {"alg": "HS256", "typ": "at+jwt", "kid": kid}, claims(uid), TEST_SECRET.encode()
        ),
        "alg none": f"{b64(json.dumps({'alg': 'none', 'typ': 'at+jwt', 'kid': kid}).encode())}.{payload}.",
        "another key, our kid": sign(claims(uid), with_key=stranger),
        "another key, its own kid": sign(claims(uid), with_key=stranger, kid="attacker-key"),
        "embedded jwk header": sign(
            claims(uid),
            with_key=stranger,
            jwk=json.loads(jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(stranger.public_key())),
        ),
        "jku header": sign(claims(uid), with_key=stranger, jku="https://evil.example/jwks.json"),
        "tampered payload": f"{header}.{b64(json.dumps(claims(uid + 1)).encode())}.{signature}",
        "tampered signature": f"{header}.{payload}.{signature[:-6]}AAAAAA",
        "wrong issuer": sign(claims(uid, iss="evil")),
        "wrong audience": sign(claims(uid, aud="someone-else")),
        "not yet valid": sign(claims(uid, nbf=int(time.time()) + 3600)),
        "missing sid": sign(claims(uid, sid=None)),
        "refresh type": sign(claims(uid), typ="refresh+jwt"),
        "unknown kid": sign(claims(uid), kid="nope"),
        "kid not a string": hs256_raw({"alg": algorithm, "typ": "at+jwt", "kid": ["x"]}, claims(uid), b"k"),
    }
    for name, forged in attacks.items():
        error = await expect_error(who(api, forged), UNAUTH)
        assert error.reason == "TOKEN_INVALID", f"{name}: {error.reason} {error.message}"
    expired = sign(
        claims(uid, iat=int(time.time()) - 7200, nbf=int(time.time()) - 7200, exp=int(time.time()) - 3600)
    )
    await expect_error(who(api, expired), UNAUTH, "TOKEN_EXPIRED")


async def test_asymmetric_key_rotation_keeps_everyone_logged_in(stack: Stack) -> None:
    old, new = new_key("EdDSA"), new_key("EdDSA")
    first = await start_api(stack, jwt_algorithm="EdDSA", jwt_private_key=private_pem(old))
    try:
        email = first.unique_email()
        await first.register(email)
        tokens = await first.login(email)
    finally:
        await stop_api(first)
    rotated = await start_api(
        stack,
        jwt_algorithm="EdDSA",
        jwt_private_key=private_pem(new),
        jwt_previous_public_keys=[public_pem(old).decode()],
    )
    try:
        me = await who(rotated, tokens.access_token)  # issued under the old key: still valid
        refreshed = await rotated.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=tokens.refresh_token)
        )
        document = await jwks(rotated)
        new_kid = jwt.get_unverified_header(refreshed.access_token)["kid"]
        old_kid = jwt.get_unverified_header(tokens.access_token)["kid"]
        assert new_kid != old_kid
        assert {k["kid"] for k in document["keys"]} == {old_kid, new_kid}
        assert (await who(rotated, refreshed.access_token)).id == me.id
    finally:
        await stop_api(rotated)
    # once the old key is retired, its tokens are refused
    retired = await start_api(stack, jwt_algorithm="EdDSA", jwt_private_key=private_pem(new))
    try:
        await expect_error(who(retired, tokens.access_token), UNAUTH, "TOKEN_INVALID")
        await who(retired, refreshed.access_token)
    finally:
        await stop_api(retired)


async def test_hmac_secret_rotation_and_migration_to_eddsa(stack: Stack) -> None:
    first = await start_api(stack)  # HS256 with TEST_SECRET
    try:
        email = first.unique_email()
        await first.register(email)
        tokens = await first.login(email)
    finally:
        await stop_api(first)
    new_secret = "rotated-secret-" + "z" * 40
    rotated = await start_api(stack, jwt_secret=new_secret, jwt_previous_secrets=[TEST_SECRET])
    try:
        await who(rotated, tokens.access_token)
        assert (await jwks(rotated)).get("keys", []) == []  # HMAC secrets are never published
    finally:
        await stop_api(rotated)
    migrated = await start_api(
        stack,
        jwt_algorithm="EdDSA",
        jwt_private_key=private_pem(new_key("EdDSA")),
        jwt_previous_secrets=[TEST_SECRET],
    )
    try:
        await who(migrated, tokens.access_token)
        fresh = await migrated.login(email)
        assert jwt.get_unverified_header(fresh.access_token)["alg"] == "EdDSA"
    finally:
        await stop_api(migrated)
    not_kept = await start_api(stack, jwt_secret=new_secret)
    try:
        await expect_error(who(not_kept, tokens.access_token), UNAUTH, "TOKEN_INVALID")
    finally:
        await stop_api(not_kept)


async def test_a_development_key_is_generated_once(stack: Stack) -> None:
    one = await start_api(stack, jwt_algorithm="ES256")
    try:
        first = await jwks(one)
    finally:
        await stop_api(one)
    two = await start_api(stack, jwt_algorithm="ES256")
    try:
        assert await jwks(two) == first
        pem = (stack.data_dir / "jwt-es256.pem").stat()
        assert pem.st_mode & 0o077 == 0
    finally:
        await stop_api(two)


def test_a_key_of_the_wrong_type_refuses_to_start() -> None:
    from referral_service.app import build_token_keys
    from referral_service.config import Settings

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        jwt_secret=TEST_SECRET,
        jwt_algorithm="ES256",
        jwt_private_key=private_pem(new_key("EdDSA")),
    )
    with pytest.raises(ValueError, match="EdDSA"):
        build_token_keys(settings, TEST_SECRET.encode())


def _arabic_indic(number: int) -> str:
    return "".join(chr(0x0660 + int(digit)) for digit in str(number))


def forged_claims(uid: int) -> dict[str, dict[str, Any]]:
    """Claims a holder of the signing key could put in a token (a leaked key, a bug in another
    issuer sharing it): each must be refused as TOKEN_INVALID, never accepted as someone and
    never INTERNAL. ``uid`` is a real user, so a lenient parser would log the forger in."""
    return {
        # sub: the canonical decimal form of a positive int64, nothing else
        "sub with a leading space": {"sub": f" {uid}"},
        "sub with a trailing space": {"sub": f"{uid} "},
        "sub with a newline": {"sub": f"{uid}\n"},
        "sub with a plus sign": {"sub": f"+{uid}"},
        "sub with a leading zero": {"sub": f"0{uid}"},
        "sub with an underscore": {"sub": f"0_{uid}"},
        "sub in Arabic-Indic digits": {"sub": _arabic_indic(uid)},
        "sub in fullwidth digits": {"sub": "".join(chr(0xFF10 + int(d)) for d in str(uid))},
        "sub in hex": {"sub": hex(uid)},
        "sub in exponent form": {"sub": f"{uid}e0"},
        "sub zero": {"sub": "0"},
        "sub negative": {"sub": f"-{uid}"},
        "sub just past int64": {"sub": str(2**63)},
        "sub past uint64": {"sub": str(2**64 + uid)},
        "sub of 30 digits": {"sub": "9" * 30},
        "sub of 2000 digits": {"sub": "9" * 2000},
        "sub empty": {"sub": ""},
        "sub a JSON number": {"sub": uid},
        "sub a float": {"sub": float(uid)},
        "sub true": {"sub": True},
        "sub a list": {"sub": [str(uid)]},
        "sub an object": {"sub": {"id": uid}},
        "sub null": {"sub": None},
        # sid and jti: non-empty strings of at most 64 visible ASCII characters
        "sid a number": {"sid": 5},
        "sid an object": {"sid": {}},
        "sid a list": {"sid": ["a"]},
        "sid true": {"sid": True},
        "sid empty": {"sid": ""},
        "sid too long": {"sid": "s" * 65},
        "sid with a space": {"sid": "a b"},
        "sid with a control character": {"sid": "a\x00b"},
        "jti a number": {"jti": 12345},
        "jti an object": {"jti": {"a": 1}},
        "jti empty": {"jti": ""},
        "jti too long": {"jti": "j" * 65},
        "jti non-ASCII": {"jti": "j\u00e9"},
        # exp, iat, nbf: JSON numbers (NumericDate) within the calendar
        "exp a string": {"exp": str(int(time.time()) + 600)},
        "exp infinite": {"exp": float("inf")},
        "exp NaN": {"exp": float("nan")},
        "exp past the year 9999": {"exp": 10**12},
        "exp huge": {"exp": 10**400},
        "iat a string": {"iat": "yesterday"},
        "iat infinite": {"iat": float("-inf")},
        "iat huge": {"iat": 10**400},
        "nbf a string": {"nbf": "0"},
        "nbf a list": {"nbf": [0]},
        "nbf NaN": {"nbf": float("nan")},
        "nbf hugely negative": {"nbf": -(10**400)},
        # and the rest
        "aud an object": {"aud": {"referral-service": True}},
        "iss a list": {"iss": ["referral-service"]},
    }


async def test_forged_claims_with_a_valid_signature_are_token_invalid(api: Api) -> None:
    """Issue 12 #13: tokens signed with the server's real key (HS256 with the test secret)
    carrying malformed claims, as access tokens (GetCurrentUser) and as refresh tokens
    (RefreshToken): UNAUTHENTICATED with TOKEN_INVALID, never a login as the user whose id a
    lenient parser reads, never INTERNAL."""
    from referral_service.crypto.jwt import hmac_kid

    user, _ = await api.user_with_token()
    kid = hmac_kid(TEST_SECRET.encode())

    def forge(payload: dict[str, Any], typ: str) -> str:
        return hs256_raw({"alg": "HS256", "typ": typ, "kid": kid}, payload, TEST_SECRET.encode())

    def payload(changes: dict[str, Any]) -> dict[str, Any]:
        values = claims(user.id)
        values.update(changes)  # None stays in as JSON null, unlike token_claims' removal
        return values

    # the control: the same forging with well-formed claims is accepted, so each refusal below
    # is the claim's doing
    assert (await who(api, forge(claims(user.id), "at+jwt"))).id == user.id
    await expect_error(
        api.auth.RefreshToken(
            auth_pb2.RefreshTokenRequest(refresh_token=forge(claims(user.id), "refresh+jwt"))
        ),
        UNAUTH,
        "TOKEN_INVALID",  # well-formed but never issued: not recognised
    )
    for name, changes in forged_claims(user.id).items():
        access = forge(payload(changes), "at+jwt")
        error = await expect_error(who(api, access), UNAUTH)
        assert error.reason == "TOKEN_INVALID", f"access token, {name}: {error.reason} {error.message}"
        refresh = forge(payload(changes), "refresh+jwt")
        error = await expect_error(
            api.auth.RefreshToken(auth_pb2.RefreshTokenRequest(refresh_token=refresh)), UNAUTH
        )
        assert error.reason == "TOKEN_INVALID", f"refresh token, {name}: {error.reason} {error.message}"
    # PyJWT reads a boolean exp as 1 (1970): refused as expired before our type check sees it
    expired = forge(payload({"exp": True}), "at+jwt")
    await expect_error(who(api, expired), UNAUTH, "TOKEN_EXPIRED")
    # the header's typ is compared exactly, whatever its JSON type
    for typ in (["at+jwt"], "AT+JWT", "jwt", None, 1):
        token = hs256_raw({"alg": "HS256", "typ": typ, "kid": kid}, claims(user.id), TEST_SECRET.encode())
        await expect_error(who(api, token), UNAUTH, "TOKEN_INVALID")
    # unknown claims are ignored (RFC 7519 section 4), however big or deep: the token's length
    # bound (4096 characters) is what limits them; JSON nested past the parser's limit is refused
    for extra in ({"x": "y" * 2500}, {"x": json.loads("[" * 900 + "]" * 900)}):
        assert (await who(api, forge(payload(extra), "at+jwt"))).id == user.id
    deep = b64(b'{"x":' + b"[" * 1400 + b"]" * 1400 + b"}")
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'at+jwt', 'kid': kid}).encode())}.{deep}"
    signature = b64(hmac.new(TEST_SECRET.encode(), signing_input.encode(), hashlib.sha256).digest())
    await expect_error(who(api, f"{signing_input}.{signature}"), UNAUTH, "TOKEN_INVALID")
    deep_header = b64(b'{"alg":"HS256","x":' + b"[" * 1400 + b"]" * 1400 + b"}")
    await expect_error(who(api, f"{deep_header}.{deep}.{signature}"), UNAUTH, "TOKEN_INVALID")
