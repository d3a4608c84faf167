"""Authentication, as each RPC declares it with the ``(referral.v1.access)`` and
``(referral.v1.scope)`` method options.

The options are read from the descriptor pool at start-up, so the proto is the single source
of truth; a method of ours without an access level, a service-only method without a scope,
or a scope the server does not know stops the server from starting. Public methods without a
scope get no authentication stage at all; the others read ``authorization: Bearer <token>``
(a user's access token or a service token), and the principal goes into the call and
``current_principal()``:

- ACCESS_AUTHENTICATED: a user; a service only when the method declares a scope it holds.
- ACCESS_SERVICE: a service holding the method's scope.
- ACCESS_PUBLIC with a scope: anyone; a call that carries a token must be a service holding the
  scope (it is then served as that service).

A call without a token whose verified client certificate is mapped to a service account
(``REFERRAL_TLS_SERVICE_ACCOUNTS``) is that service account, with all its scopes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from referral.v1 import options_pb2

from referral_service.domain.errors import PermissionDenied, Reason, Unauthenticated
from referral_service.domain.models import Principal
from referral_service.pipeline.call import Call, Handler, Stage
from referral_service.pipeline.context import principal_var

#: The access token -> the principal, or a DomainError (the token use case).
Authenticate = Callable[[str], Awaitable[Principal]]
#: A verified client certificate's identity -> the service account principal it maps to, None
#: when it maps to none, or a DomainError (a revoked account).
AuthenticateCertificate = Callable[[str], Awaitable[Principal | None]]

PUBLIC = options_pb2.ACCESS_PUBLIC
AUTHENTICATED = options_pb2.ACCESS_AUTHENTICATED
SERVICE = options_pb2.ACCESS_SERVICE


@dataclass(frozen=True, slots=True)
class AccessRule:
    level: int
    #: The scope a service needs ("" when services may not call the method).
    scope: str = ""


def access_rules(services: Iterable[ServiceDescriptor], scopes: Collection[str]) -> dict[str, AccessRule]:
    """Map ``/package.Service/Method`` to its access rule."""
    rules: dict[str, AccessRule] = {}
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            level = options.Extensions[options_pb2.access]
            scope = options.Extensions[options_pb2.scope]
            if level == options_pb2.ACCESS_UNSPECIFIED:
                raise RuntimeError(f"{method.full_name} has no (referral.v1.access) option")
            if level == SERVICE and not scope:
                raise RuntimeError(f"{method.full_name} is ACCESS_SERVICE without a (referral.v1.scope)")
            if scope and scope not in scopes:
                raise RuntimeError(f"{method.full_name} declares an unknown scope {scope!r}")
            rules[f"/{service.full_name}/{method.name}"] = AccessRule(level, scope)
    return rules


def _token_missing() -> Unauthenticated:
    return Unauthenticated(
        Reason.TOKEN_MISSING,
        "this call needs an access token: send 'authorization: Bearer <access_token>' metadata",
    )


def bearer(header: str | None) -> str:
    """The token of an ``authorization: Bearer <token>`` header."""
    if not header:
        raise _token_missing()
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            Reason.TOKEN_INVALID, "the authorization metadata must be 'Bearer <access_token>'"
        )
    return token.strip()


def _scope_missing(rule: AccessRule, principal: Principal) -> PermissionDenied:
    if not rule.scope:
        return PermissionDenied(
            Reason.PERMISSION_DENIED, "service accounts cannot call this RPC: it acts as a signed-in user"
        )
    who = "this service token" if principal.is_service else "a user token"
    return PermissionDenied(
        Reason.SCOPE_MISSING,
        f"this RPC needs a service token with the scope {rule.scope!r}, which {who} does not carry",
        metadata={"required_scope": rule.scope},
    )


def admitted(rule: AccessRule, principal: Principal) -> bool:
    if principal.is_service:
        return bool(rule.scope) and rule.scope in principal.scopes
    return rule.level == AUTHENTICATED


class Authentication:
    def __init__(
        self,
        rules: Mapping[str, AccessRule],
        authenticate: Authenticate,
        certificate: AuthenticateCertificate | None = None,
    ) -> None:
        self.rules = dict(rules)
        self._authenticate = authenticate
        self._certificate = certificate

    @classmethod
    def from_services(
        cls,
        services: Iterable[ServiceDescriptor],
        authenticate: Authenticate,
        scopes: Collection[str],
        certificate: AuthenticateCertificate | None = None,
    ) -> Authentication:
        return cls(access_rules(services, scopes), authenticate, certificate)

    async def _principal(self, call: Call) -> Principal | None:
        """Who the call is: its bearer token's principal; without a token, the service account
        its client certificate maps to; else None."""
        if call.authorization:
            return await self._authenticate(bearer(call.authorization))
        if call.peer_identity and self._certificate is not None:
            return await self._certificate(call.peer_identity)
        return None

    def stage(self, method: str) -> Stage | None:
        """The method's authentication stage; None for a public method without a scope."""
        rule = self.rules[method]
        if rule.level == PUBLIC and not rule.scope:
            return None
        optional = rule.level == PUBLIC
        identify = self._principal

        def wrap(inner: Handler) -> Handler:
            async def authenticated(request: Any, call: Call) -> Any:
                principal = await identify(call)
                if principal is None:
                    if optional:
                        return await inner(request, call)
                    raise _token_missing()
                if not admitted(rule, principal):
                    raise _scope_missing(rule, principal)
                call.principal = principal
                principal_var.set(principal)
                return await inner(request, call)

            return authenticated

        return wrap
