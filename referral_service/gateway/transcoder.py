"""The HTTP/JSON transport: an ASGI application built from the ``google.api.http`` annotations
in the descriptor pool (no hand-written routes), calling the RPCs in-process through the same
request pipeline as gRPC (authentication, rate limits, error mapping, one access line).

For each request: find the binding (404 when no path matches, 405 with ``Allow`` when the path
exists with other methods), build the request message from the path variables, the query string
(for bindings without ``body: "*"``) and the JSON body with protobuf's JSON mapping (400 with one
field violation per bad or unknown field), build the pipeline's ``Call`` (``Authorization``,
``x-request-id``, the HTTP client's address and the client-address header, the verified client
certificate's identity, the route template)
and run the method's chain, then answer with the response as protobuf JSON, or a failed call's
``google.rpc.Status`` as the AIP-193 error envelope. The request id comes back as the
``x-request-id`` header of every response.

Hostile input is refused where it enters, with the envelope: bodies not labelled JSON (415),
JSON the parser should not see (``jsonmap.parse_json``), bad percent-encoding, header values
that are not visible ASCII (Authorization 401, the others ignored), a Content-Length over the
limit (413 before reading). Whatever else goes wrong is a 500 INTERNAL envelope, its traceback
logged once (``_internal``); requests h11 cannot parse get their envelope from ``server.py``.

Every HTTP request gets exactly one access line: from the pipeline when it reached an RPC, from
here (``log_access``, same logger and fields) when it did not. Lines name the route template,
never the raw path, so no email from a path or query reaches the logs.

Every request is also counted in ``http_server_request_duration_seconds`` by method (a known
method, else ``_OTHER``), route template and status, so no label takes a value from the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import status_pb2

from referral_service import metrics
from referral_service.domain.errors import DomainError, Reason, Unauthenticated
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
from referral_service.pipeline import errors as codes
from referral_service.pipeline.call import (
    AUTHORIZATION,
    END_USER_ADDRESS,
    REQUEST_ID,
    USER_AGENT,
    Call,
    CallFailed,
    Handler,
    ip_peer,
)
from referral_service.pipeline.call import request_id as new_request_id
from referral_service.pipeline.context import log_access

Scope = MutableMapping[str, Any]
Message_ = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message_]]
Send = Callable[[Message_], Awaitable[None]]
#: ASGI scope extension the HTTP server adds on connections whose client certificate it
#: verified: ``{"identity": "spiffe://..."}`` (see ``server.py``).
TLS_PEER = "referral_service.tls_peer"


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    async def send(self, send: Send) -> None:
        headers = [(b"content-type", self.content_type.encode("latin-1"))]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


@dataclass
class StreamResponse(Response):
    """A server-streaming RPC's messages as they come: one JSON document per line (NDJSON), or
    one server-sent event each (``data: <json>``). Ends when the client goes away (the stream
    is closed then) or the stream ends; an error midway is a last line / ``event: error`` with
    the AIP-193 envelope (the status line has long been sent)."""

    stream: Any = None
    sse: bool = False
    receive: Receive | None = None
    call: Call | None = None

    def _frame(self, data: Any, event: str = "") -> bytes:
        text = json.dumps(data, separators=(",", ":"))
        if not self.sse:
            return text.encode() + b"\n"
        return (f"event: {event}\n" if event else "").encode() + f"data: {text}\n\n".encode()

    async def send(self, send: Send) -> None:
        headers = [(b"content-type", self.content_type.encode("latin-1"))]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        stream, receive = self.stream, self.receive
        assert stream is not None
        assert receive is not None

        async def pump() -> None:
            async with contextlib.aclosing(stream):
                try:
                    async for message in stream:
                        data = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
                        await send(
                            {"type": "http.response.body", "body": self._frame(data), "more_body": True}
                        )
                except Exception as error:
                    request_id = self.call.request_id if self.call is not None else ""
                    if isinstance(error, DomainError):
                        status = codes.from_domain(error, request_id)
                    else:
                        log.exception("unhandled error in a stream", extra={"request_id": request_id})
                        status = codes.internal(request_id)
                    _, body, _ = envelope.from_status(status)
                    await send(
                        {"type": "http.response.body", "body": self._frame(body, "error"), "more_body": True}
                    )

        async def gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        pumping = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(gone())
        try:
            done, _ = await asyncio.wait((pumping, watching), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pumping, watching):
                task.cancel()
            await asyncio.gather(pumping, watching, return_exceptions=True)
        if watching not in done:  # the stream ended: end the response
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


#: What is served beside the RPCs (docs, /openapi.json, /healthz): (HTTP method, path) -> the
#: route label for the access line and the response, or None when the path is not one of them.
Extra = Callable[[str, str], Awaitable[tuple[str, Response] | None]]

log = logging.getLogger("referral_service.gateway")

#: Request bodies are JSON, labelled so: ``application/json`` or ``application/<x>+json``,
#: optionally with ``charset=utf-8``. Nothing else is read, not even a form: a web page can make
#: a browser send a form or ``text/plain`` to any site without asking (no CORS preflight), but
#: not ``application/json``, so this is what keeps other sites from calling the API with their
#: visitors' browsers (registering accounts, logging in).
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[a-z0-9!#$&^_.+-]+\+)?json")
#: Header values the gateway reads must be visible ASCII (RFC 9110 field-vchar, SP; HTAB as
#: optional white space in the list header X-Forwarded-For). obs-text (bytes 0x80-0xFF) and
#: control characters are refused (Authorization) or ignored (the others).
_VISIBLE = re.compile(r"[\x20-\x7e]*")
_VISIBLE_OR_TAB = re.compile(r"[\t\x20-\x7e]*")
#: A ``%`` that does not start a percent-encoded byte (RFC 3986 section 2.1).
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
#: HTTP methods counted by name; any other is counted as ``_OTHER`` (OpenTelemetry's rule).
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})


class HttpMetrics:
    """``http_server_request_duration_seconds`` and ``http_server_active_requests``; the labelled
    series are kept once made (method, route and status all come from bounded sets), recorded in
    the per-process accumulators of ``metrics.py``."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, int], metrics.LocalHistogram] = {}
        self.active = metrics.LocalGauge.of(metrics.HTTP_ACTIVE)

    def observe(self, verb: str, route: str, status: int, seconds: float) -> None:
        key = (verb, route, status)
        series = self._series.get(key)
        if series is None:
            method = verb if verb in _KNOWN_METHODS else "_OTHER"
            # The route label without the method the access line puts in front of it.
            template = route.partition(" ")[2] if route.startswith(f"{verb[:16]} ") else route
            series = metrics.LocalHistogram.of(
                metrics.HTTP_DURATION.labels(
                    http_request_method=method,
                    http_route=template or "(none)",
                    http_response_status_code=str(status),
                )
            )
            if len(self._series) < 4096:  # bounded anyway; never let a bug grow it without end
                self._series[key] = series
        series.observe(seconds)


def is_json_media_type(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json``, with no parameter but ``charset=utf-8``."""
    if not content_type:
        return False
    media_type, *parameters = content_type.split(";")
    if not _JSON_MEDIA_TYPE.fullmatch(media_type.strip().lower()):
        return False
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if not parameter.strip():
            continue
        if name.strip().lower() != "charset" or value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def _check_percent_encoding(raw: bytes, what: str, plus_is_space: bool = False) -> None:
    """RequestError when a ``%`` in a path or query is not followed by two hex digits or the
    decoded bytes are not UTF-8 (which decoding would otherwise replace silently)."""
    if _BAD_PERCENT.search(raw):
        raise RequestError(
            f"the {what} has a '%' that is not followed by two hex digits",
            [Violation("", f"percent-encode the {what} (RFC 3986)", "MALFORMED")],
        )
    try:
        unquote_to_bytes(raw.replace(b"+", b" ") if plus_is_space else raw).decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(
            f"the {what} is not percent-encoded UTF-8",
            [Violation("", f"percent-encode the {what} as UTF-8", "MALFORMED")],
        ) from None


@dataclass(frozen=True)
class Route:
    binding: descriptors.Binding
    template: Template
    request_class: type[Message]
    response_class: type[Message]

    @property
    def verb(self) -> str:
        return self.binding.verb

    @property
    def label(self) -> str:
        """``GET /v1/referral-codes/by-email/{email}``: how the access line names the route."""
        return f"{self.binding.verb} {self.binding.template}"


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


def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    try:
        body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a lone surrogate from the request, echoed: \u escapes instead
        body = json.dumps(data, separators=(",", ":")).encode()
    return Response(status, body, "application/json", {"cache-control": "no-store", **(headers or {})})


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    """The client closed the connection before the request was read: nobody to answer."""


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Transcoder:
    """ASGI app. ``invokers`` are the pipeline's composed handlers by gRPC method path;
    ``extra`` handlers (docs, openapi.json, health) are asked first."""

    def __init__(
        self,
        routes: list[Route],
        invokers: Mapping[str, Handler],
        *,
        max_body_bytes: int,
        cors_origins: Iterable[str] = (),
        extra: Iterable[Extra] = (),
        client_address_header: str | None = "x-forwarded-for",
        quiet_paths: Iterable[str] = (),
        spans: Any | None = None,
    ) -> None:
        """``quiet_paths``: paths served by ``extra`` whose access lines are logged at DEBUG
        (health probes, metrics scrapes); ``spans``: with tracing on, makes each request's
        server span (``tracing.HttpServerSpans``)."""
        missing = {route.binding.grpc_path for route in routes} - set(invokers)
        if missing:
            raise ValueError(f"no handler for {', '.join(sorted(missing))}")
        self._invokers = dict(invokers)
        self._address_header = client_address_header.lower() if client_address_header else ""
        self._routes = routes
        self._max_body = max_body_bytes
        self._cors = set(cors_origins)
        self._extra = list(extra)
        self._quiet = frozenset(quiet_paths)
        self._metrics = HttpMetrics()
        self._spans = spans

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
        started = time.perf_counter()
        self._metrics.active.inc()
        try:
            if self._spans is None:
                await self._serve(scope, receive, send, started)
            else:
                with self._spans.span(scope) as finish:
                    route, status = await self._serve(scope, receive, send, started)
                    finish(route.partition(" ")[2] if " " in route else route, status)
        finally:
            self._metrics.active.dec()

    async def _serve(self, scope: Scope, receive: Receive, send: Send, started: float) -> tuple[str, int]:
        """Answer the request; its route label and HTTP status."""
        headers = _headers(scope, joined=self._address_header)
        client = scope.get("client")
        forwarded = headers.get(self._address_header) if self._address_header else None
        if forwarded and not _VISIBLE_OR_TAB.fullmatch(forwarded):
            forwarded = None  # not believed: the connection's peer is the client
        tls_peer = scope.get("extensions", {}).get(TLS_PEER)
        call = Call(
            "",
            "http",
            new_request_id(headers.get(REQUEST_ID)),
            ip_peer(*client) if client else "",
            started,
            headers.get(AUTHORIZATION),
            (forwarded,) if forwarded else (),
            headers.get(END_USER_ADDRESS),
            peer_identity=tls_peer["identity"] if tls_peer else None,
            user_agent=headers.get(USER_AGENT),
        )
        try:
            response, logged = await self._respond(scope, receive, headers, call)
        except ClientGone:
            call.code, call.reason = codes.CANCELLED, Reason.CANCELLED.value
            log_access(call, 499)
            self._metrics.observe(scope["method"].upper(), call.route, 499, time.perf_counter() - started)
            return call.route, 499
        except Exception:  # the last resort: an envelope, never uvicorn's plain-text 500
            response, logged = self._internal(call), False
        response.headers["x-request-id"] = call.request_id
        response.headers.update(self._cors_headers(headers))
        await response.send(send)
        self._metrics.observe(
            scope["method"].upper(), call.route, response.status, time.perf_counter() - started
        )
        if not logged:  # never reached an RPC, whose chain logs the line
            quiet = scope["path"] in self._quiet
            log_access(call, response.status, logging.DEBUG if quiet else logging.INFO)
        return call.route, response.status

    async def _respond(
        self, scope: Scope, receive: Receive, headers: dict[str, str], call: Call
    ) -> tuple[Response, bool]:
        """The response, and whether the request reached an RPC (whose chain logged it)."""
        verb = scope["method"].upper()
        for extra in self._extra:
            answered = await extra(verb, scope["path"])
            if answered is not None:
                call.route, response = answered
                if response.status >= 400:
                    call.code = codes.UNAVAILABLE
                return response, False
        found = await self._transcode(scope, receive, headers, call, verb)
        if isinstance(found, Response):
            return found, False
        route, request = found
        if route.binding.method.server_streaming:
            return await self._open_stream(route, request, call, headers, receive), True
        return await self._invoke(route, request, call), True

    # --- CORS ---------------------------------------------------------------------------

    def _cors_headers(self, headers: dict[str, str]) -> dict[str, str]:
        origin = headers.get("origin")
        if not origin or not self._cors or not ("*" in self._cors or origin in self._cors):
            return {}
        if not _VISIBLE.fullmatch(origin):
            return {}  # never echoed
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

    async def _transcode(
        self, scope: Scope, receive: Receive, headers: dict[str, str], call: Call, verb: str
    ) -> tuple[Route, Message] | Response:
        """The route and request message, or the gateway's own response (404, 405, OPTIONS, a
        request that does not transcode)."""
        raw_path = (scope.get("raw_path") or scope["path"].encode()).split(b"?", 1)[0]
        path = raw_path.decode("latin-1")
        try:
            _check_percent_encoding(raw_path, "path")
        except RequestError as error:
            call.route = f"{verb[:16]} (malformed path)"
            return self._request_error(call, error)
        routes, values = self._match(path)
        if not routes:
            call.route = f"{verb[:16]} (no route)"
            return self._error(
                call,
                404,
                codes.NOT_FOUND,
                f"no API method is bound to {path[:200]}; see /openapi.json",
                Reason.HTTP_ROUTE_NOT_FOUND,
            )
        allow = ", ".join(sorted({*routes, "OPTIONS"}))
        route = routes.get(verb)
        if route is None:
            call.route = f"{verb[:16]} {next(iter(routes.values())).binding.template}"
            if verb == "OPTIONS":
                preflight = {
                    "access-control-allow-methods": allow,
                    "access-control-allow-headers": "authorization, content-type, x-request-id",
                    "access-control-max-age": "600",
                }
                cors = self._cors_headers(headers)
                return Response(204, b"", "text/plain", {"allow": allow, **(preflight if cors else {})})
            return self._error(
                call,
                405,
                codes.UNIMPLEMENTED,
                f"{path} does not accept {verb}; it accepts {allow}",
                Reason.HTTP_METHOD_NOT_ALLOWED,
                headers={"allow": allow},
                metadata={"allow": allow},
            )
        call.route = route.label
        call.method = route.binding.grpc_path
        authorization = headers.get(AUTHORIZATION)
        if authorization is not None and not _VISIBLE.fullmatch(authorization):
            refused = Unauthenticated(
                Reason.TOKEN_INVALID,
                "the Authorization header must be 'Bearer <access_token>' in visible ASCII",
            )
            return self._status_response(call, codes.from_domain(refused, call.request_id), refused.reason)
        declared = headers.get("content-length", "")
        try:
            if declared.isdigit() and (len(declared) > 18 or int(declared) > self._max_body):
                raise BodyTooLarge  # refused before reading a byte of it
            request = await self._request(route, values[verb], scope, receive, headers)
        except BodyTooLarge:
            # uvicorn discards the rest of the body; closing the connection instead would reset
            # it under a client still sending, which would never see this answer.
            return self._error(
                call,
                413,
                codes.RESOURCE_EXHAUSTED,
                f"the request body is larger than {self._max_body} bytes",
                Reason.HTTP_REQUEST_TOO_LARGE,
            )
        except UnsupportedMediaType as error:
            return self._error(
                call,
                415,
                codes.INVALID_ARGUMENT,
                "the request body must be JSON, sent as 'Content-Type: application/json'; got "
                + (repr(error.args[0][:100]) if error.args[0] else "no Content-Type"),
                Reason.HTTP_UNSUPPORTED_MEDIA_TYPE,
            )
        except RequestError as error:
            return self._request_error(call, error)
        return route, request

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
            # No body at all is an empty request ({}), whatever the content type says: there is
            # nothing to misread. Any byte of body must be labelled JSON.
            if raw and not is_json_media_type(headers.get("content-type")):
                raise UnsupportedMediaType(headers.get("content-type", ""))
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
            raw_query = scope.get("query_string", b"")
            _check_percent_encoding(raw_query, "query string", plus_is_space=True)
            query_string = raw_query.decode("latin-1")
            for key, value in parse_qsl(query_string, keep_blank_values=True, errors="strict"):
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

    async def _invoke(self, route: Route, request: Message, call: Call) -> Response:
        """The RPC in-process, through the method's chain (which logs the call's line). Never
        raises an Exception: whatever goes wrong becomes an envelope."""
        try:
            response = await self._invokers[call.method](request, call)
            payload: Message = response
            if route.binding.response_body:
                payload = getattr(response, route.binding.response_body)
            data = json_format.MessageToDict(
                payload, always_print_fields_with_no_presence=not call.sparse_response
            )
            return json_response(200, data)
        except CallFailed as failed:
            http_status, body, extra = envelope.from_status(failed.status)
            return json_response(http_status, body, extra)
        except Exception:  # past the chain's error mapping (rendering the response, say)
            return self._internal(call)

    async def _open_stream(
        self, route: Route, request: Message, call: Call, headers: dict[str, str], receive: Receive
    ) -> Response:
        """A server-streaming RPC: its chain admits the call and returns the stream, sent as
        NDJSON, or as server-sent events when the client accepts ``text/event-stream``."""
        try:
            stream = await self._invokers[call.method](request, call)
        except CallFailed as failed:
            http_status, body, extra = envelope.from_status(failed.status)
            return json_response(http_status, body, extra)
        except Exception:
            return self._internal(call)
        sse = "text/event-stream" in headers.get("accept", "")
        return StreamResponse(
            200,
            b"",
            "text/event-stream" if sse else "application/x-ndjson",
            {"cache-control": "no-store", "x-accel-buffering": "no"},
            stream=stream,
            sse=sse,
            receive=receive,
            call=call,
        )

    def _internal(self, call: Call) -> Response:
        """An unexpected exception (being handled) -> logged once with its traceback; the client
        gets INTERNAL with the request id, nothing about the error."""
        log.exception(
            "unhandled error in the HTTP gateway (%s)",
            call.route or "no route",
            extra={"request_id": call.request_id},
        )
        return self._status_response(call, codes.internal(call.request_id), Reason.INTERNAL_ERROR)

    def _status_response(self, call: Call, status: status_pb2.Status, reason: Reason) -> Response:
        """A ``google.rpc.Status`` made by the gateway -> its envelope; recorded on the call."""
        call.code, call.reason = status.code, reason.value
        http_status, body, extra = envelope.from_status(status)
        return json_response(http_status, body, extra)

    def _request_error(self, call: Call, error: RequestError) -> Response:
        return self._error(
            call,
            400,
            codes.INVALID_ARGUMENT,
            error.message,
            Reason.VALIDATION_FAILED,
            violations=error.violations,
        )

    def _error(
        self,
        call: Call,
        http_status: int,
        code: int,
        message: str,
        reason: Reason,
        *,
        violations: list[Violation] | tuple[Violation, ...] = (),
        headers: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Response:
        """An error of the gateway itself, before any RPC; recorded on the call for its line."""
        call.code, call.reason = code, reason.value
        body = envelope.gateway_error(
            http_status,
            code,
            message,
            reason=reason.value,
            request_id=call.request_id,
            violations=violations,
            metadata=metadata,
        )
        return json_response(http_status, body, headers)


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
