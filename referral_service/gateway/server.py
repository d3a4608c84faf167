"""The HTTP side of the process: uvicorn serving the transcoder, ``/openapi.json``, ``/docs``
(Swagger UI from the ``swagger-ui-bundle-v2`` package, no CDN) and the probes (``probes.py``:
``/healthz``, ``/readyz``, ``/livez``, ``/metrics``), in the same event loop as the gRPC server.
RPCs run in-process through the request pipeline (no gRPC channel, no loopback hop); the probes
answer from the process's health state and the metrics. Both are handed in by the composition
root (``app.py``). ``MetricsServer`` serves only the probes, on the metrics port.

The listening socket is bound when the gateway is built (so a busy port fails start-up early and
port 0 gives a port that is known at once); uvicorn gets the socket. Signals stay with the
owner of the loop (the CLI): uvicorn's own signal capture is switched off.

With TLS the composition root hands in the ``ssl.SSLContext`` to listen with (``tls.py``: it
follows the certificate files). When that context asks clients for a certificate, each
connection whose certificate it verified gets that certificate's identity once, at connection
time, and every request on it carries it to the transcoder in the ``TLS_PEER`` scope extension
(uvicorn itself does not expose the peer certificate to the application).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import math
import socket
import ssl
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from referral_service import metrics
from referral_service.domain.errors import Reason
from referral_service.gateway import descriptors, envelope, openapi
from referral_service.gateway.jsonmap import Violation
from referral_service.gateway.probes import QUIET_PATHS, Probes
from referral_service.gateway.transcoder import (
    TLS_PEER,
    Receive,
    Response,
    Scope,
    Send,
    Transcoder,
    build_routes,
    json_response,
)
from referral_service.pipeline.call import Call, Handler, ip_peer, request_id
from referral_service.pipeline.context import log_access
from referral_service.pipeline.errors import INVALID_ARGUMENT
from referral_service.pipeline.identity import certificate_identity

#: Files of the Swagger UI package served under /docs/ (nothing else is reachable there).
_SWAGGER_ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui-standalone-preset.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self' data:; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)


def _swagger_dir() -> Path:
    from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

    return Path(str(swagger_ui_path))


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    cache: str


def load_account_pages() -> dict[str, Asset]:
    """The pages the links of our messages open (always served, docs or not)."""
    static = importlib.resources.files("referral_service.gateway").joinpath("static")
    html = "text/html; charset=utf-8"
    return {
        "/verify-email": Asset(static.joinpath("verify-email.html").read_bytes(), html, "no-store"),
        "/reset-password": Asset(static.joinpath("reset-password.html").read_bytes(), html, "no-store"),
        "/account/pages.js": Asset(
            static.joinpath("account.js").read_bytes(), "text/javascript; charset=utf-8", "no-cache"
        ),
        "/account/pages.css": Asset(
            static.joinpath("account.css").read_bytes(), "text/css; charset=utf-8", "no-cache"
        ),
    }


def load_assets() -> dict[str, Asset]:
    """The /docs page and its assets, read once into memory."""
    static = importlib.resources.files("referral_service.gateway").joinpath("static")
    assets = {
        "/docs": Asset(static.joinpath("docs.html").read_bytes(), "text/html; charset=utf-8", "no-cache"),
        "/docs/init.js": Asset(
            static.joinpath("init.js").read_bytes(), "text/javascript; charset=utf-8", "no-cache"
        ),
    }
    swagger = _swagger_dir()
    for name, content_type in _SWAGGER_ASSETS.items():
        assets[f"/docs/{name}"] = Asset((swagger / name).read_bytes(), content_type, "public, max-age=86400")
    return assets


class _H11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection, answering a request that is not HTTP/1.1 at all (a garbled
    request line, a header block over 16 KiB, a bad Content-Length: h11 refuses it before the
    application sees it) with the AIP-193 envelope and an access line, not plain text."""

    def send_400_response(self, msg: str) -> None:
        call = Call(
            "",
            "http",
            request_id(None),
            ip_peer(*self.client) if self.client else "",
            time.perf_counter(),
            route="(malformed HTTP)",
            code=INVALID_ARGUMENT,
            reason=Reason.VALIDATION_FAILED.value,
        )
        body = json_response(
            400,
            envelope.gateway_error(
                400,
                INVALID_ARGUMENT,
                "the request is not valid HTTP/1.1",
                reason=Reason.VALIDATION_FAILED.value,
                request_id=call.request_id,
                violations=[Violation("", "malformed request line, headers or framing", "MALFORMED")],
            ),
        ).body
        headers = [
            (b"content-type", b"application/json"),
            (b"cache-control", b"no-store"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", call.request_id.encode()),
            (b"connection", b"close"),
        ]
        try:
            start = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
            self.transport.write(self.conn.send(start) or b"")
            self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
            self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            pass  # a response was already under way: nothing sensible can follow it
        self.transport.close()
        log_access(call, 400)
        metrics.HTTP_DURATION.labels(
            http_request_method="_OTHER", http_route="(malformed HTTP)", http_response_status_code="400"
        ).observe(time.perf_counter() - call.started)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The process owner handles SIGTERM/SIGINT and stops us through HttpGateway.stop().
        yield


def verified_peer_identity(transport: asyncio.BaseTransport) -> str | None:
    """The identity of the client certificate the handshake verified (``getpeercert()`` is
    empty when there was none, or when the context does not verify)."""
    connection = transport.get_extra_info("ssl_object")
    if not isinstance(connection, ssl.SSLObject) or connection.context.verify_mode is ssl.CERT_NONE:
        return None
    certificate: Any = connection.getpeercert()
    if not certificate:
        return None
    uris = [value for kind, value in certificate.get("subjectAltName", ()) if kind == "URI"]
    names = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    return certificate_identity(uris, names)


class _PeerIdentityProtocol(_H11Protocol):
    """Our HTTP/1.1 protocol, plus the verified client certificate's identity in the
    scope of every request on the connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        identity = verified_peer_identity(transport)
        if identity is None:
            return
        app = self.app
        extension = {"identity": identity}

        async def with_identity(scope: Scope, receive: Receive, send: Send) -> None:
            scope["extensions"] = {**scope.get("extensions", {}), TLS_PEER: extension}
            await app(scope, receive, send)

        self.app = with_identity


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, reuse_port=reuse_port, backlog=2048)
    sock.setblocking(False)
    return sock


class HttpGateway:
    """Owns the HTTP socket and the uvicorn server."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        invokers: Mapping[str, Handler],
        probes: Probes,
        max_body_bytes: int,
        cors_origins: list[str],
        docs_enabled: bool,
        client_address_header: str | None = "x-forwarded-for",
        ssl_context: ssl.SSLContext | None = None,
        spans: Any | None = None,
    ) -> None:
        """``invokers``: the pipeline's handler of each RPC by gRPC method path; ``probes``: the
        health probes and (unless the metrics have their own port) ``/metrics``; ``ssl_context``:
        serve HTTPS with it (None: plain HTTP); ``spans``: with tracing on, a server span per
        request (``tracing.HttpServerSpans``)."""
        self._sock = sock
        self._ssl = ssl_context
        self._probes = probes
        self._docs = docs_enabled
        self._openapi = json.dumps(openapi.document(), indent=1).encode() if docs_enabled else b""
        self._assets = load_assets() if docs_enabled else {}
        self._pages = load_account_pages()
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = Transcoder(
            build_routes(descriptors.bindings()),
            invokers,
            max_body_bytes=max_body_bytes,
            cors_origins=cors_origins,
            extra=[probes.respond, self._extras],
            client_address_header=client_address_header,
            quiet_paths=QUIET_PATHS,
            spans=spans,
        )

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def host(self) -> str:
        return str(self._sock.getsockname()[0])

    @property
    def scheme(self) -> str:
        return "https" if self._ssl is not None else "http"

    async def start(self) -> None:
        # The transcoder logs one line per request, with the request id: uvicorn's access log is
        # off. Its access_log=False only detaches the logger's handlers (uvicorn logs whenever
        # the logger has any), so the logger is disabled outright.
        logging.getLogger("uvicorn.access").disabled = True
        tls: dict[str, Any] = {}
        protocol: type[_H11Protocol] = _H11Protocol
        if self._ssl is not None:
            context = self._ssl
            tls["ssl_context_factory"] = lambda _config, _default: context
            if context.verify_mode is not ssl.CERT_NONE:
                protocol = _PeerIdentityProtocol
        config = uvicorn.Config(
            self.app,
            http=protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=None,
            **tls,
        )
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the start-up failure
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self, grace: float) -> None:
        """Stop accepting connections, give in-flight requests ``grace`` seconds, close."""
        if self._server is not None and self._task is not None:
            self._server.config.timeout_graceful_shutdown = max(1, math.ceil(grace))
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=grace + 2)
            except TimeoutError:
                self._server.force_exit = True
                await self._task
        else:
            self._sock.close()

    # --- what is not an RPC ---------------------------------------------------------------

    async def _extras(self, verb: str, path: str) -> tuple[str, Response] | None:
        """The route label (a fixed path) and the response for the docs and the account pages."""
        if verb not in ("GET", "HEAD"):
            return None
        page = self._pages.get(path)
        if page is not None:
            headers = {
                "cache-control": page.cache,
                "x-content-type-options": "nosniff",
                "referrer-policy": "no-referrer",
                "content-security-policy": _CSP,
            }
            return f"{verb} {path}", Response(
                200, page.body if verb == "GET" else b"", page.content_type, headers
            )
        if not self._docs:
            return None
        if path == "/openapi.json":
            return f"{verb} {path}", Response(
                200, self._openapi, "application/json", {"cache-control": "no-cache"}
            )
        if path in ("/", "/docs/"):
            return f"{verb} {path}", Response(307, b"", "text/plain", {"location": "/docs"})
        asset = self._assets.get(path)
        if asset is None:
            return None
        headers = {
            "cache-control": asset.cache,
            "x-content-type-options": "nosniff",
        }
        if path == "/docs":
            headers["content-security-policy"] = _CSP
        body = asset.body if verb == "GET" else b""
        return f"{verb} {path}", Response(200, body, asset.content_type, headers)


class MetricsServer(HttpGateway):
    """The metrics port: ``/metrics`` and the health probes only (plain HTTP), so that the API
    port need not expose them. Anything else is a 404 envelope."""

    def __init__(self, sock: socket.socket, probes: Probes) -> None:
        self._sock = sock
        self._ssl = None
        self._server = None
        self._task = None
        self.app = Transcoder([], {}, max_body_bytes=1024, extra=[probes.respond], quiet_paths=QUIET_PATHS)
