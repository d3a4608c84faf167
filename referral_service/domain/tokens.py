"""JWT access and refresh tokens (PyJWT).

Both are HS256 JWTs, explicitly typed (RFC 8725 section 3.11) in the header: ``at+jwt`` for
access tokens (RFC 9068) and ``refresh+jwt`` for refresh tokens, so one is never accepted as the
other. Verification pins the algorithm, checks the signature before any claim, then requires and
checks ``exp``, ``iat``, ``nbf``, ``iss``, ``aud``, ``sub``, ``jti`` and ``sid`` (the login
session, which is also the refresh-token family). Revocation is checked by the caller.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

from referral_service.domain.errors import Reason, Unauthenticated

ALGORITHM = "HS256"
ACCESS_TYP = "at+jwt"
REFRESH_TYP = "refresh+jwt"
MAX_TOKEN_LENGTH = 4096
_REQUIRED = ["exp", "iat", "nbf", "iss", "aud", "sub", "jti", "sid"]


@dataclass(frozen=True, slots=True)
class TokenConfig:
    secret: bytes
    issuer: str
    audience: str
    access_ttl: timedelta
    refresh_ttl: timedelta
    leeway_seconds: int = 30


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    jti: str
    session_id: str
    expire_time: datetime


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    user_id: int
    jti: str
    session_id: str
    expire_time: datetime


class TokenCodec:
    def __init__(self, config: TokenConfig) -> None:
        self._config = config
        self.kid = hashlib.sha256(b"referral-service kid:" + config.secret).hexdigest()[:16]

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
            claims, self._config.secret, algorithm=ALGORITHM, headers={"typ": typ, "kid": self.kid}
        )
        return IssuedToken(token=token, jti=jti, session_id=session_id, expire_time=expire)

    def issue_access(self, user_id: int, session_id: str, now: datetime) -> IssuedToken:
        return self._issue(ACCESS_TYP, user_id, session_id, self._config.access_ttl, now)

    def issue_refresh(self, user_id: int, session_id: str, now: datetime) -> IssuedToken:
        return self._issue(REFRESH_TYP, user_id, session_id, self._config.refresh_ttl, now)

    def verify(self, token: str, typ: str) -> VerifiedToken:
        what = "access token" if typ == ACCESS_TYP else "refresh token"
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} is malformed")
        try:
            decoded = jwt.api_jwt.decode_complete(
                token,
                self._config.secret,
                algorithms=[ALGORITHM],
                audience=self._config.audience,
                issuer=self._config.issuer,
                leeway=self._config.leeway_seconds,
                options={"require": _REQUIRED, "verify_signature": True},
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
        except jwt.InvalidTokenError:
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} is invalid") from None
        header = decoded["header"]
        if header.get("typ") != typ:
            raise Unauthenticated(
                Reason.TOKEN_INVALID,
                f"the token is not an {what}" if typ == ACCESS_TYP else f"the token is not a {what}",
            )
        if header.get("kid") not in (None, self.kid):
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} was signed with an unknown key")
        claims = decoded["payload"]
        try:
            user_id = int(claims["sub"])
            jti = str(claims["jti"])
            sid = str(claims["sid"])
            exp = datetime.fromtimestamp(int(claims["exp"]), tz=UTC)
        except (TypeError, ValueError, OverflowError, OSError):
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} is invalid") from None
        if user_id <= 0 or not jti or not sid or len(jti) > 64 or len(sid) > 64:
            raise Unauthenticated(Reason.TOKEN_INVALID, f"the {what} is invalid")
        return VerifiedToken(user_id=user_id, jti=jti, session_id=sid, expire_time=exp)
