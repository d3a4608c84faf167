"""JWT access and refresh tokens (PyJWT), signed with named keys: the ``TokenCodec`` port.

Tokens are typed (RFC 8725 section 3.11) in the header: ``at+jwt`` for access tokens (RFC 9068)
and ``refresh+jwt`` for refresh tokens, so one is never accepted as the other. Every token names
its key with ``kid``. Verification looks the key up by ``kid`` (unknown kid: refused), pins the
algorithm to *that key's* algorithm (so a token cannot choose how it is checked: no ``none``, no
HS256 signed with a published public key), checks the signature before any claim, then requires
and checks ``exp``, ``iat``, ``nbf``, ``iss``, ``aud``, ``sub``, ``jti`` and ``sid`` (the login
session, which is also the refresh-token family), types and forms included: a correctly signed
token with ``sub: " 1"`` or a 30-digit ``sub`` is as invalid as a badly signed one. Unknown
claims are ignored (RFC 7519 section 4). Revocation is checked by the caller.

Keys: one signing key (HS256 with the shared secret, or EdDSA/ES256 with a private key) and any
number of verification-only keys, so keys rotate without logging anyone out: sign with the new
key, keep the old one for verification until the last token it signed has expired. Public keys
of asymmetric keys are published as a JWKS (RFC 7517).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from referral_service.domain.errors import Reason, Unauthenticated
from referral_service.domain.models import ServiceAccount
from referral_service.domain.ports import (
    ACCESS_TOKEN,
    MAX_TOKEN_LENGTH,
    REFRESH_TOKEN,
    SERVICE_TOKEN,
    IssuedToken,
    VerifiedServiceToken,
    VerifiedToken,
)

ALGORITHM = "HS256"
ACCESS_TYP = "at+jwt"
REFRESH_TYP = "refresh+jwt"
#: Service tokens: a type of their own, so that no verifier takes one for a user's token.
SERVICE_TYP = "svc+jwt"
_REQUIRED = ["exp", "iat", "nbf", "iss", "aud", "sub", "jti", "sid"]
_SERVICE_REQUIRED = ["exp", "iat", "nbf", "iss", "aud", "sub", "jti", "client_id", "scope", "sa"]
_KINDS = {ACCESS_TYP: ACCESS_TOKEN, REFRESH_TYP: REFRESH_TOKEN, SERVICE_TYP: SERVICE_TOKEN}
_WHAT = {ACCESS_TYP: "access token", REFRESH_TYP: "refresh token", SERVICE_TYP: "service token"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class TokenKey:
    """A named key. ``signer`` is None for a verification-only key."""

    kid: str
    algorithm: str
    verifier: Any
    signer: Any = None
    #: The public JWK (RFC 7517) of an asymmetric key; None for HMAC secrets (never published).
    jwk: dict[str, str] | None = field(default=None, hash=False, compare=False)


def hmac_kid(secret: bytes) -> str:
    return hashlib.sha256(b"referral-service kid:" + secret).hexdigest()[:16]


def hmac_key(secret: bytes, *, signing: bool = True) -> TokenKey:
    return TokenKey(
        kid=hmac_kid(secret), algorithm="HS256", verifier=secret, signer=secret if signing else None
    )


def _public_jwk(public: Any) -> tuple[str, dict[str, str]]:
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        members = {"crv": "Ed25519", "kty": "OKP", "x": _b64(raw)}
        algorithm = "EdDSA"
    elif isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        numbers = public.public_numbers()
        members = {
            "crv": "P-256",
            "kty": "EC",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
        }
        algorithm = "ES256"
    else:
        raise ValueError("JWT keys must be Ed25519 (EdDSA) or EC P-256 (ES256)")
    # RFC 7638 thumbprint: the required members, sorted, no white space.
    thumbprint = _b64(
        hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest()
    )
    return algorithm, {**members, "kid": thumbprint, "alg": algorithm, "use": "sig"}


def pem_key(pem: bytes, *, signing: bool = True) -> TokenKey:
    """An Ed25519 or P-256 key from PEM. A private key signs (when ``signing``); a public key
    only verifies."""
    private: Any = None
    try:
        private = serialization.load_pem_private_key(pem, password=None)
        public = private.public_key()
    except ValueError:
        public = serialization.load_pem_public_key(pem)
    algorithm, jwk = _public_jwk(public)
    return TokenKey(
        kid=jwk["kid"],
        algorithm=algorithm,
        verifier=public,
        signer=private if signing else None,
        jwk=jwk,
    )


@dataclass(frozen=True, slots=True)
class TokenConfig:
    signing_key: TokenKey
    issuer: str
    audience: str
    access_ttl: timedelta
    refresh_ttl: timedelta
    leeway_seconds: int = 30
    #: Keys still accepted (rotation); the signing key is always accepted.
    verification_keys: Sequence[TokenKey] = ()


class JwtCodec:
    """The ``TokenCodec`` port with JWTs."""

    def __init__(self, config: TokenConfig) -> None:
        if config.signing_key.signer is None:
            raise ValueError("the signing key has no private part")
        self._config = config
        self._key = config.signing_key
        self.kid = config.signing_key.kid
        self._keys: dict[str, TokenKey] = {}
        for key in (*config.verification_keys, config.signing_key):
            self._keys[key.kid] = key

    def jwks(self) -> list[dict[str, str]]:
        """The public keys (JWK) of every asymmetric key tokens are verified with; HMAC secrets
        are never published."""
        return [dict(key.jwk) for key in self._keys.values() if key.jwk is not None]

    @property
    def access_ttl(self) -> timedelta:
        return self._config.access_ttl

    @property
    def refresh_ttl(self) -> timedelta:
        return self._config.refresh_ttl

    def _issue(self, typ: str, user_id: int, session_id: str, ttl: timedelta, now: datetime) -> IssuedToken:
        jti = uuid.uuid4().hex
        expire = now + ttl
        claims: dict[str, Any] = {
            "iss": self._config.issuer,
            "aud": self._config.audience,
            "sub": str(user_id),
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int(expire.timestamp()),
            "jti": jti,
            "sid": session_id,
        }
        token = jwt.encode(
            claims, self._key.signer, algorithm=self._key.algorithm, headers={"typ": typ, "kid": self.kid}
        )
        return IssuedToken(token=token, jti=jti, session_id=session_id, expire_time=expire)

    def issue_access(self, user_id: int, session_id: str, now: datetime) -> IssuedToken:
        return self._issue(ACCESS_TYP, user_id, session_id, self._config.access_ttl, now)

    def issue_refresh(self, user_id: int, session_id: str, now: datetime) -> IssuedToken:
        return self._issue(REFRESH_TYP, user_id, session_id, self._config.refresh_ttl, now)

    def verify_access(self, token: str) -> VerifiedToken:
        return self.verify(token, ACCESS_TYP)

    def verify_refresh(self, token: str) -> VerifiedToken:
        return self.verify(token, REFRESH_TYP)

    def issue_service(self, account: ServiceAccount, scopes: Sequence[str], now: datetime) -> IssuedToken:
        jti = uuid.uuid4().hex
        expire = now + self._config.access_ttl
        claims: dict[str, Any] = {
            "iss": self._config.issuer,
            "aud": self._config.audience,
            "sub": account.client_id,
            "client_id": account.client_id,
            "sa": account.id,
            "svc": account.name,
            "scope": " ".join(scopes),
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int(expire.timestamp()),
            "jti": jti,
        }
        token = jwt.encode(
            claims,
            self._key.signer,
            algorithm=self._key.algorithm,
            headers={"typ": SERVICE_TYP, "kid": self.kid},
        )
        return IssuedToken(token=token, jti=jti, session_id="", expire_time=expire)

    def verify_service(self, token: str) -> VerifiedServiceToken:
        payload = self._decode(token, SERVICE_TYP, _SERVICE_REQUIRED)
        verified = _service_claims(payload)
        if verified is None:
            raise Unauthenticated(Reason.TOKEN_INVALID, "the service token is invalid")
        return verified

    def kind_of(self, token: str) -> str:
        try:
            typ = jwt.get_unverified_header(token).get("typ")
        except (jwt.InvalidTokenError, RecursionError):
            return ""
        return _KINDS.get(typ, "") if isinstance(typ, str) else ""

    def verify(self, token: str, typ: str) -> VerifiedToken:
        verified = _claims(self._decode(token, typ, _REQUIRED))
        if verified is None:
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {_WHAT[typ]} is invalid")
        return verified

    def _decode(self, token: str, typ: str, required: list[str]) -> Any:
        """The payload of a token of type ``typ`` whose signature, issuer, audience and times
        check out; else Unauthenticated."""
        what = _WHAT[typ]
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} is malformed")
        # RecursionError: JSON nested past the parser's limit (PyJWT 2.15 maps it to DecodeError
        # itself; caught here too so that no PyJWT version turns a hostile token into INTERNAL).
        try:
            unverified = jwt.get_unverified_header(token)
        except (jwt.InvalidTokenError, RecursionError):
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} is malformed") from None
        kid = unverified.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} was signed with an unknown key")
        if unverified.get("alg") != key.algorithm:
            # RFC 8725 section 3.1: the key decides the algorithm, never the token.
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} uses the wrong algorithm for its key")
        try:
            decoded = jwt.api_jwt.decode_complete(
                token,
                key.verifier,
                algorithms=[key.algorithm],
                audience=self._config.audience,
                issuer=self._config.issuer,
                leeway=self._config.leeway_seconds,
                options={"require": required, "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(Reason.TOKEN_EXPIRED, f"the {what} has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} is for another audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} has an unknown issuer") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} signature is invalid") from None
        except (jwt.InvalidTokenError, RecursionError):
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} is invalid") from None
        header = decoded["header"]
        if header.get("typ") != typ:
            raise Unauthenticated(
                Reason.TOKEN_INVALID,
                f"the token is not an {what}" if typ == ACCESS_TYP else f"the token is not a {what}",
            )
        return decoded["payload"]


#: ``sub``: a user id in its one canonical form, the decimal digits ``str(id)`` writes (no sign,
#: white space, leading zeros, underscores or non-ASCII digits, all of which ``int()`` accepts).
_USER_ID = re.compile(r"[1-9][0-9]{0,18}")
_MAX_USER_ID = 2**63 - 1  # BIGINT
#: ``jti`` and ``sid``: what we issue is hex; accepted is visible ASCII, at most 64 characters.
_TOKEN_ID = re.compile(r"[!-~]{1,64}")
#: NumericDate claims (RFC 7519 section 2) within the calendar: 1970 to 9999-12-31T23:59:59Z.
_MAX_NUMERIC_DATE = 253_402_300_799


def _numeric_date(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not (0 <= value <= _MAX_NUMERIC_DATE):  # also refuses NaN (every comparison is false)
        return None
    return float(value)


def _claims(claims: Any) -> VerifiedToken | None:
    """The claims of a token whose signature, issuer, audience and times PyJWT has checked,
    checked for their types and forms: a signed token still says nothing we did not mean to
    issue. None when any is malformed."""
    if not isinstance(claims, dict):
        return None
    sub, jti, sid = claims.get("sub"), claims.get("jti"), claims.get("sid")
    if not (isinstance(sub, str) and _USER_ID.fullmatch(sub) and int(sub) <= _MAX_USER_ID):
        return None
    if not (isinstance(jti, str) and _TOKEN_ID.fullmatch(jti)):
        return None
    if not (isinstance(sid, str) and _TOKEN_ID.fullmatch(sid)):
        return None
    exp = _numeric_date(claims.get("exp"))
    if exp is None or _numeric_date(claims.get("iat")) is None or _numeric_date(claims.get("nbf")) is None:
        return None
    return VerifiedToken(
        user_id=int(sub),
        jti=jti,
        session_id=sid,
        expire_time=datetime.fromtimestamp(int(exp), tz=UTC),
        issue_time=datetime.fromtimestamp(int(claims["iat"]), tz=UTC),
    )


#: Client ids we issue are ``svc_`` and hex; scope names are lower-case words with a colon.
_CLIENT_ID = re.compile(r"[!-~]{1,64}")
_SCOPE = re.compile(r"[a-z]+:[a-z]+")
_SERVICE_NAME = re.compile(r"[!-~]{1,64}")


def _service_claims(claims: Any) -> VerifiedServiceToken | None:
    """The claims of a service token (signature and times checked), checked for their forms."""
    if not isinstance(claims, dict):
        return None
    sub, client_id, account, name = (
        claims.get("sub"),
        claims.get("client_id"),
        claims.get("sa"),
        claims.get("svc"),
    )
    scope, jti = claims.get("scope"), claims.get("jti")
    if not (isinstance(client_id, str) and _CLIENT_ID.fullmatch(client_id) and sub == client_id):
        return None
    if isinstance(account, bool) or not isinstance(account, int) or not 0 < account <= _MAX_USER_ID:
        return None
    if not (isinstance(name, str) and _SERVICE_NAME.fullmatch(name)):
        return None
    if not isinstance(scope, str) or len(scope) > 512:
        return None
    scopes = tuple(scope.split(" ")) if scope else ()
    if not all(_SCOPE.fullmatch(item) for item in scopes):
        return None
    if not (isinstance(jti, str) and _TOKEN_ID.fullmatch(jti)):
        return None
    exp, iat = _numeric_date(claims.get("exp")), _numeric_date(claims.get("iat"))
    if exp is None or iat is None or _numeric_date(claims.get("nbf")) is None:
        return None
    return VerifiedServiceToken(
        account_id=account,
        client_id=client_id,
        name=name,
        scopes=scopes,
        jti=jti,
        expire_time=datetime.fromtimestamp(int(exp), tz=UTC),
        issue_time=datetime.fromtimestamp(int(iat), tz=UTC),
    )
