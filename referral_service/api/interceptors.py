"""The server interceptor: request id, access log, authentication, error mapping.

One interceptor wraps every unary-unary handler of our services once (wrapped handlers are
cached per method). Which methods need a token is read from the ``(referral.v1.access)`` method
option in the descriptor pool at start-up, so the proto is the single source of truth; a method
of ours without the option stops the server from starting. Health and reflection are public and
pass through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from referral.v1 import options_pb2

from referral_service.api import errors
from referral_service.api.ratelimits import Grant, RateLimits
from referral_service.domain.errors import DomainError, InvalidArgument, Reason, Unauthenticated
from referral_service.domain.models import Principal

access_log = logging.getLogger("referral_service.access")
log = logging.getLogger("referral_service.api")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

Authenticate = Callable[[str], Awaitable[Principal]]
Context = grpc.aio.ServicerContext[Any, Any]
Handler = Any  # grpc.RpcMethodHandler, whose stubs describe the sync server only
Behavior = Callable[[Any, Context], Awaitable[Any]]


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


def read_only_methods(services: Iterable[ServiceDescriptor]) -> set[str]:
    """``/package.Service/Method`` of the methods bound to HTTP GET by ``google.api.http``: by
    AIP-131/132 they read and change nothing, so there is no transaction to protect."""
    from google.api import annotations_pb2

    return {
        f"/{service.full_name}/{method.name}"
        for service in services
        for method in service.methods
        if method.GetOptions().Extensions[annotations_pb2.http].get
    }


#: Request ids the server makes: a random per-process prefix and a counter (unique across
#: processes and restarts, and far cheaper than a uuid4 per call).
_REQUEST_ID_PREFIX = os.urandom(8).hex()
_request_counter = itertools.count(1)


def request_id(given: str | None) -> str:
    """The caller's ``x-request-id`` when it is a sane id, else a new one (gRPC and HTTP alike)."""
    if given and _REQUEST_ID_RE.fullmatch(given):
        return given
    return f"{_REQUEST_ID_PREFIX}{next(_request_counter):016x}"


def current_principal() -> Principal:
    principal = principal_var.get()
    if principal is None:  # only reachable if a method's access rule is wrong
        raise Unauthenticated(Reason.TOKEN_MISSING, "this call needs an access token")
    return principal


#: Set by the HTTP/JSON gateway on the calls it forwards: the HTTP client's address, and a key
#: only the service's own processes know (derived from the JWT secret), so that per-address rate
#: limits apply to the HTTP client and not to the gateway's loopback connection.
GATEWAY_CLIENT = "x-referral-gateway-client"
GATEWAY_AUTH = "x-referral-gateway-auth"
#: The client-address header (``REFERRAL_RATE_LIMIT_CLIENT_ADDRESS_HEADER``) the HTTP client sent,
#: passed on by the gateway: believed only when the HTTP client is a trusted proxy.
GATEWAY_FORWARDED = "x-referral-gateway-forwarded"
_WANTED = ("authorization", "x-request-id", GATEWAY_CLIENT, GATEWAY_AUTH, GATEWAY_FORWARDED)


def gateway_auth_key(secret: bytes) -> str:
    return hmac.new(secret, b"referral-service http gateway", hashlib.sha256).hexdigest()


def _metadata(context: Context, proxy_header: str | None) -> tuple[dict[str, str], list[str]]:
    """One pass over the call's metadata: the first value of each key we read, and every value
    of the trusted-proxy address header (when rate limits use one)."""
    found: dict[str, str] = {}
    forwarded: list[str] = []
    for key, value in context.invocation_metadata() or ():
        if not isinstance(value, str):
            continue
        if key in _WANTED:
            found.setdefault(key, value)
        elif key == proxy_header:
            forwarded.append(value)
    return found, forwarded


def _bearer(header: str | None) -> str:
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


class ApiInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        rules: dict[str, bool],
        authenticate: Authenticate,
        limits: RateLimits | None = None,
        gateway_auth: str | None = None,
        finish_when_cancelled: bool = False,
        read_only: set[str] | None = None,
    ) -> None:
        self._finish_when_cancelled = finish_when_cancelled
        self._read_only = read_only or set()
        self._rules = rules
        self._authenticate = authenticate
        self._limits = limits
        self._gateway_auth = gateway_auth
        self._handlers: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method: str = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or method not in self._rules:
            return handler
        # The request is parsed inside the wrapper (not by grpc), so that a corrupt payload is
        # INVALID_ARGUMENT with our error envelope instead of grpc's UNKNOWN with a traceback.
        wrapped: Handler = grpc.unary_unary_rpc_method_handler(
            self._wrap(method, self._rules[method], handler.unary_unary, handler.request_deserializer),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )
        self._handlers[method] = wrapped
        return wrapped

    def _wrap(
        self, method: str, needs_token: bool, inner: Behavior, parse: Callable[[bytes], Any] | None
    ) -> Behavior:
        authenticate = self._authenticate
        limits = self._limits if self._limits is not None and self._limits.applies(method) else None
        gateway_auth = self._gateway_auth
        proxy_header = limits.address.header if limits is not None else None
        finish_when_cancelled = self._finish_when_cancelled and method not in self._read_only

        async def run(request: Any, context: Context) -> Any:
            if not finish_when_cancelled:
                return await inner(request, context)
            # The caller gave up (deadline, cancel): let the unit of work finish (commit or roll
            # back) before the call ends, instead of interrupting a database transaction midway.
            # With aiosqlite an interrupted transaction can leave its connection holding SQLite's
            # write lock until it is garbage-collected, blocking every later write.
            work = asyncio.ensure_future(inner(request, context))
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                with contextlib.suppress(BaseException):
                    await work
                raise

        async def behavior(raw: Any, context: Context) -> Any:
            started = time.perf_counter()
            meta, forwarded = _metadata(context, proxy_header)
            call_id = request_id(meta.get("x-request-id"))
            request_id_var.set(call_id)
            peer: str = context.peer()
            code = grpc.StatusCode.OK
            reason = ""
            try:
                try:
                    request = parse(raw) if parse is not None else raw
                except DecodeError:
                    raise InvalidArgument(
                        Reason.VALIDATION_FAILED, "the request is not a valid protobuf message of this method"
                    ) from None
                if needs_token:
                    principal_var.set(await authenticate(_bearer(meta.get("authorization"))))
                grants: list[Grant] = []
                if limits is not None:
                    via_gateway = meta.get(GATEWAY_CLIENT)
                    if (
                        via_gateway
                        and gateway_auth is not None
                        and hmac.compare_digest(meta.get(GATEWAY_AUTH, ""), gateway_auth)
                    ):
                        hops = meta.get(GATEWAY_FORWARDED)
                        client = limits.address.resolve_ip(via_gateway, [hops] if hops else [])
                    else:
                        client = limits.address.resolve(peer, forwarded)
                    grants = await limits.admit(method, request, client)
                failure: Reason | None = None
                try:
                    response = await run(request, context)
                except DomainError as error:
                    failure = error.reason
                    raise
                finally:
                    if grants:
                        assert limits is not None
                        await limits.settle(grants, failure)
                context.set_trailing_metadata((("x-request-id", call_id),))
                return response
            except DomainError as error:
                status = errors.from_domain(error, call_id)
                code, reason = status.code, error.reason.value
                await cast(Any, context).abort_with_status(status)
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                log.exception("unhandled error in %s", method, extra={"request_id": call_id})
                status = errors.internal(call_id)
                code, reason = status.code, Reason.INTERNAL_ERROR.value
                await cast(Any, context).abort_with_status(status)
            finally:
                principal = principal_var.get()
                elapsed_ms = (time.perf_counter() - started) * 1000
                access_log.info(
                    "%s %s %.1fms",
                    method,
                    code.name,
                    elapsed_ms,
                    extra={
                        "method": method,
                        "code": code.name,
                        "reason": reason,
                        "duration_ms": round(elapsed_ms, 3),
                        "request_id": call_id,
                        "peer": peer,
                        "user_id": principal.user_id if principal else None,
                    },
                )

        return behavior
