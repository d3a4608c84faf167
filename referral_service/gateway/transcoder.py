"""The HTTP/JSON -> gRPC transcoder: an ASGI application built from the ``google.api.http``
annotations in the descriptor pool (no hand-written routes).

For each request: find the binding (404 when no path matches, 405 with ``Allow`` when the path
exists with other methods), build the request message from the path variables, the query string
(for bindings without ``body: "*"``) and the JSON body with protobuf's JSON mapping (400 with one
field violation per bad or unknown field), call the RPC over a loopback ``grpc.aio`` channel to
the same server (so the ApiInterceptor runs exactly once, as for any gRPC client), and answer
with the response as protobuf JSON or the AIP-193 error envelope.

``Authorization`` and ``x-request-id`` are passed on as metadata; the server's ``x-request-id``
comes back as a response header.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from referral_service.api.interceptors import GATEWAY_AUTH, GATEWAY_CLIENT, GATEWAY_FORWARDED
from referral_service.api.interceptors import request_id as new_request_id
from referral_service.domain.errors import Reason
from referral_service.gateway import descriptors, envelope
from referral_service.gateway.jsonmap import (
    RequestError,
    Violation,
    find_field,
    parse_json,
    set_path,
    to_message,
)
from referral_service.gateway.paths import Template, compile_template

log = logging.getLogger("referral_service.gateway")

Scope = MutableMapping[str, Any]
Message_ = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message_]]
Send = Callable[[Message_], Awaitable[None]]
Extra = Callable[[Scope, Receive, Send], Awaitable[bool]]

_JSON_TYPES = ("application/json", "")
# Accepted for ``body: "*"`` bindings, like query parameters (HTML forms, OAuth 2.0 clients);
# a form-typed body that is a JSON object is read as JSON, so `curl -d '{...}'` works.
_FORM = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Route:
    binding: descriptors.Binding
    template: Template
    request_class: type[Message]
    response_class: type[Message]

    @property
    def verb(self) -> str:
        return self.binding.verb


def build_routes(bindings: Iterable[descriptors.Binding]) -> list[Route]:
    routes = [
        Route(
            binding,
            compile_template(binding.template),
            GetMessageClass(binding.method.input_type),
            GetMessageClass(binding.method.output_type),
        )
        for binding in bindings
    ]
    for route in routes:
        for field_path, _ in route.template.variables:
            _require_field(route, field_path)
        if route.binding.body not in ("", "*"):
            _require_field(route, route.binding.body)
    # The most literal template wins when several match (/v1/users/me before /v1/users/{id}).
    routes.sort(key=lambda route: -route.template.literals)
    return routes


def _require_field(route: Route, dotted: str) -> None:
    descriptor: Any = route.request_class.DESCRIPTOR
    for part in dotted.split("."):
        field = find_field(descriptor, part) if descriptor is not None else None
        if field is None:
            raise ValueError(f"{route.binding.method.full_name}: {dotted!r} is not a request field")
        descriptor = field.message_type


class Response:
    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers = {"content-type": content_type, **(headers or {})}

    async def send(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": self.body})


def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(status, body, "application/json", {"cache-control": "no-store", **(headers or {})})


class BodyTooLarge(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Transcoder:
    """ASGI app. ``extra`` handlers (docs, openapi.json, health) run first and return True when
    they answered."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        routes: list[Route],
        *,
        max_body_bytes: int,
        timeout_seconds: float,
        cors_origins: Iterable[str] = (),
        extra: Iterable[Extra] = (),
        gateway_auth: str | None = None,
        client_address_header: str = "x-forwarded-for",
    ) -> None:
        self._gateway_auth = gateway_auth
        self._address_header = client_address_header.lower()
        self._channel = channel
        self._routes = routes
        self._max_body = max_body_bytes
        self._timeout = timeout_seconds
        self._cors = set(cors_origins)
        self._extra = list(extra)
        self._calls = {
            route.binding.grpc_path: channel.unary_unary(
                route.binding.grpc_path,
                request_serializer=route.request_class.SerializeToString,
                response_deserializer=route.response_class.FromString,
            )
            for route in routes
        }

    @property
    def routes(self) -> list[Route]:
        return self._routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":  # uvicorn runs with lifespan off; be a good citizen anyway
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        headers = _headers(scope, joined=self._address_header)
        cors = self._cors_headers(headers)
        for handler in self._extra:
            if await handler(scope, receive, send):
                return
        response = await self._handle(scope, receive, headers, cors)
        response.headers.update(cors)
        await response.send(send)

    # --- CORS ---------------------------------------------------------------------------

    def _cors_headers(self, headers: dict[str, str]) -> dict[str, str]:
        origin = headers.get("origin")
        if not origin or not self._cors or not ("*" in self._cors or origin in self._cors):
            return {}
        return {
            "access-control-allow-origin": origin,
            "vary": "Origin",
            "access-control-expose-headers": "x-request-id, www-authenticate, retry-after",
        }

    # --- requests -----------------------------------------------------------------------

    def _match(self, raw_path: str) -> tuple[dict[str, Route], dict[str, dict[str, str]]]:
        routes: dict[str, Route] = {}
        values: dict[str, dict[str, str]] = {}
        for route in self._routes:
            if route.verb in routes:
                continue
            found = route.template.match(raw_path)
            if found is not None:
                routes[route.verb] = route
                values[route.verb] = found
        return routes, values

    async def _handle(
        self, scope: Scope, receive: Receive, headers: dict[str, str], cors: dict[str, str]
    ) -> Response:
        request_id = new_request_id(headers.get("x-request-id"))
        raw_path = scope.get("raw_path") or scope["path"].encode()
        path = raw_path.decode("latin-1").split("?", 1)[0]
        method = scope["method"].upper()
        routes, values = self._match(path)
        if not routes:
            return self._error(
                404,
                grpc.StatusCode.NOT_FOUND,
                f"no API method is bound to {path}; see /openapi.json",
                Reason.HTTP_ROUTE_NOT_FOUND,
                request_id,
            )
        allow = ", ".join(sorted({*routes, "OPTIONS"}))
        if method == "OPTIONS":
            preflight = {
                "access-control-allow-methods": allow,
                "access-control-allow-headers": "authorization, content-type, x-request-id",
                "access-control-max-age": "600",
            }
            return Response(204, b"", "text/plain", {"allow": allow, **(preflight if cors else {})})
        route = routes.get(method)
        if route is None:
            return self._error(
                405,
                grpc.StatusCode.UNIMPLEMENTED,
                f"{path} does not accept {method}; it accepts {allow}",
                Reason.HTTP_METHOD_NOT_ALLOWED,
                request_id,
                headers={"allow": allow},
                metadata={"allow": allow},
            )
        try:
            request = await self._request(route, values[method], scope, receive, headers)
        except BodyTooLarge:
            return self._error(
                413,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the request body is larger than {self._max_body} bytes",
                Reason.HTTP_REQUEST_TOO_LARGE,
                request_id,
            )
        except UnsupportedMediaType as error:
            return self._error(
                415,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request body must be application/json (or a form), not {error.args[0]}",
                Reason.HTTP_UNSUPPORTED_MEDIA_TYPE,
                request_id,
            )
        except RequestError as error:
            return self._error(
                400,
                grpc.StatusCode.INVALID_ARGUMENT,
                error.message,
                Reason.VALIDATION_FAILED,
                request_id,
                violations=error.violations,
            )
        client = scope.get("client")
        return await self._forward(route, request, headers, request_id, client[0] if client else None)

    async def _request(
        self,
        route: Route,
        path_values: dict[str, str],
        scope: Scope,
        receive: Receive,
        headers: dict[str, str],
    ) -> Message:
        binding = route.binding
        descriptor: Any = route.request_class.DESCRIPTOR
        data: dict[str, Any] = {}
        raw = await read_body(receive, self._max_body)
        if binding.body:
            content_type = headers.get("content-type", "application/json").split(";")[0].strip().lower()
            is_form = content_type == _FORM and not raw.lstrip().startswith(b"{")
            if raw.strip() and content_type not in (*_JSON_TYPES, _FORM):
                raise UnsupportedMediaType(content_type or "(none)")
            if is_form and binding.body == "*":
                form: dict[str, list[str]] = {}
                for key, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True):
                    form.setdefault(key, []).append(value)
                for key, form_values in form.items():
                    set_path(data, descriptor, key, form_values, origin="form field")
            elif is_form and raw.strip():
                raise UnsupportedMediaType(content_type)
            else:
                body = parse_json(raw) if raw.strip() else {}
                if binding.body == "*":
                    if not isinstance(body, dict):
                        to_message(body, route.request_class)  # raises: must be an object
                    data = body
                else:
                    field = find_field(descriptor, binding.body)
                    assert field is not None
                    data = {field.json_name: body}
        elif raw.strip():
            raise RequestError(
                f"{binding.verb} {binding.template} takes no request body",
                [Violation("", "send the fields as query parameters", "UNEXPECTED_BODY")],
            )
        for field_path, value in path_values.items():
            _drop(data, descriptor, field_path)
            set_path(data, descriptor, field_path, [value], origin="path variable")
        if binding.body != "*":
            query: dict[str, list[str]] = {}
            query_string = scope.get("query_string", b"").decode("latin-1")
            for key, value in parse_qsl(query_string, keep_blank_values=True):
                query.setdefault(key, []).append(value)
            bound = {_normal(descriptor, name) for name in path_values}
            if binding.body:
                bound.add(_normal(descriptor, binding.body))
            for key, query_values in query.items():
                if _normal(descriptor, key) in bound:
                    raise RequestError(
                        f"query parameter {key!r} is already bound by the path or body",
                        [Violation(key, "set it in the path or body only", "INVALID")],
                    )
                set_path(data, descriptor, key, query_values, origin="query parameter")
        elif scope.get("query_string"):
            raise RequestError(
                f"{binding.verb} {binding.template} takes its fields in the JSON body",
                [Violation("", "query parameters are not accepted here; send them in the body", "INVALID")],
            )
        return to_message(data, route.request_class)

    async def _forward(
        self,
        route: Route,
        request: Message,
        headers: dict[str, str],
        request_id: str,
        client: str | None,
    ) -> Response:
        metadata: list[tuple[str, str]] = [("x-request-id", request_id)]
        if "authorization" in headers:
            metadata.append(("authorization", headers["authorization"]))
        if client and self._gateway_auth:
            # per-address rate limits apply to the HTTP client, not to this loopback channel
            metadata += [(GATEWAY_CLIENT, client), (GATEWAY_AUTH, self._gateway_auth)]
            forwarded = headers.get(self._address_header)
            if forwarded:  # the HTTP client may be a load balancer (trusted or not: the server decides)
                metadata.append((GATEWAY_FORWARDED, forwarded[:2048]))
        call = self._calls[route.binding.grpc_path](request, metadata=metadata, timeout=self._timeout)
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            trailers = error.trailing_metadata()
            status, body, extra = envelope.from_rpc_error(
                error.code(), error.details() or error.code().name, tuple(trailers or ())
            )
            if not any(d.get("@type", "").endswith("RequestInfo") for d in body["error"]["details"]):
                body["error"]["details"].append(
                    {"@type": "type.googleapis.com/google.rpc.RequestInfo", "requestId": request_id}
                )
            return json_response(status, body, {"x-request-id": _trailer(trailers, request_id), **extra})
        trailers = await call.trailing_metadata()
        payload: Message = response
        if route.binding.response_body:
            payload = getattr(response, route.binding.response_body)
        data = json_format.MessageToDict(payload, always_print_fields_with_no_presence=True)
        return json_response(200, data, {"x-request-id": _trailer(trailers, request_id)})

    def _error(
        self,
        http_status: int,
        code: grpc.StatusCode,
        message: str,
        reason: Reason,
        request_id: str,
        *,
        violations: list[Violation] | tuple[Violation, ...] = (),
        headers: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Response:
        body = envelope.gateway_error(
            http_status,
            code,
            message,
            reason=reason.value,
            request_id=request_id,
            violations=violations,
            metadata=metadata,
        )
        return json_response(http_status, body, {"x-request-id": request_id, **(headers or {})})


class UnsupportedMediaType(Exception):
    pass


def _headers(scope: Scope, joined: str = "") -> dict[str, str]:
    """The request's headers by lower-case name: the first value of each, but every value of the
    list header ``joined`` (the client-address header), comma-joined as RFC 9110 allows."""
    found: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        name = key.decode("latin-1").lower()
        if name not in found:
            found[name] = value.decode("latin-1")
        elif name == joined:
            found[name] += ", " + value.decode("latin-1")
    return found


def _trailer(trailers: Any, default: str) -> str:
    for key, value in trailers or ():
        if key == "x-request-id" and isinstance(value, str):
            return value
    return default


def _normal(descriptor: Any, dotted: str) -> str:
    """A field path in proto names, whichever names it was given in."""
    parts = []
    current = descriptor
    for part in dotted.split("."):
        field: FieldDescriptor | None = find_field(current, part) if current is not None else None
        if field is None:
            parts.append(part)
            current = None
            continue
        parts.append(field.name)
        current = field.message_type
    return ".".join(parts)


def _drop(data: dict[str, Any], descriptor: Any, dotted: str) -> None:
    """Path variables win over the same field in a ``body: "*"`` body (as in grpc-gateway)."""
    parts = dotted.split(".")
    target: Any = data
    current = descriptor
    for part in parts[:-1]:
        field = find_field(current, part)
        if field is None or not isinstance(target, dict):
            return
        target = target.get(field.json_name, target.get(field.name))
        current = field.message_type
    field = find_field(current, parts[-1]) if current is not None else None
    if field is not None and isinstance(target, dict):
        target.pop(field.json_name, None)
        target.pop(field.name, None)
