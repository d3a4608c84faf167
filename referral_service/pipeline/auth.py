"""Authentication, as each RPC declares it with the ``(referral.v1.access)`` method option.

The options are read from the descriptor pool at start-up, so the proto is the single source
of truth; a method of ours without the option stops the server from starting. Public methods
get no authentication stage at all; the others read ``authorization: Bearer <access token>``,
and the principal goes into the call and ``current_principal()``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor
from referral.v1 import options_pb2

from referral_service.domain.errors import Reason, Unauthenticated
from referral_service.domain.models import Principal
from referral_service.pipeline.call import Call, Handler, Stage
from referral_service.pipeline.context import principal_var

#: The access token -> the principal, or a DomainError (the token use case).
Authenticate = Callable[[str], Awaitable[Principal]]


def access_rules(services: Iterable[ServiceDescriptor]) -> dict[str, bool]:
    """Map ``/package.Service/Method`` to True when the method needs an access token."""
    rules: dict[str, bool] = {}
    for service in services:
        for method in service.methods:
            level = method.GetOptions().Extensions[options_pb2.access]
            if level == options_pb2.ACCESS_UNSPECIFIED:
                raise RuntimeError(f"{method.full_name} has no (referral.v1.access) option")
            rules[f"/{service.full_name}/{method.name}"] = level != options_pb2.ACCESS_PUBLIC
    return rules


def bearer(header: str | None) -> str:
    """The token of an ``authorization: Bearer <token>`` header."""
    if not header:
        raise Unauthenticated(
            Reason.TOKEN_MISSING,
            "this call needs an access token: send 'authorization: Bearer <access_token>' metadata",
        )
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(
            Reason.TOKEN_INVALID, "the authorization metadata must be 'Bearer <access_token>'"
        )
    return token.strip()


class Authentication:
    def __init__(self, rules: Mapping[str, bool], authenticate: Authenticate) -> None:
        self.rules = dict(rules)
        self._authenticate = authenticate

    @classmethod
    def from_services(
        cls, services: Iterable[ServiceDescriptor], authenticate: Authenticate
    ) -> Authentication:
        return cls(access_rules(services), authenticate)

    def stage(self, method: str) -> Stage | None:
        """The method's authentication stage; None for a public method."""
        if not self.rules[method]:
            return None
        authenticate = self._authenticate

        def wrap(inner: Handler) -> Handler:
            async def authenticated(request: Any, call: Call) -> Any:
                principal = await authenticate(bearer(call.authorization))
                call.principal = principal
                principal_var.set(principal)
                return await inner(request, call)

            return authenticated

        return wrap
