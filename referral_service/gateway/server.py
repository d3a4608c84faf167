"""The HTTP side of the process: uvicorn serving the transcoder, ``/openapi.json``, ``/docs``
(Swagger UI from the ``swagger-ui-bundle-v2`` package, no CDN) and ``/healthz``, in the same
event loop as the gRPC server.

The listening socket is bound when the gateway is built (so a busy port fails start-up early and
port 0 gives a port that is known at once); uvicorn gets the socket. Signals stay with the
owner of the loop (the CLI): uvicorn's own signal capture is switched off.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import math
import socket
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health_pb2

from referral_service.gateway import descriptors, openapi
from referral_service.gateway.transcoder import (
    Receive,
    Response,
    Scope,
    Send,
    Transcoder,
    build_routes,
    json_response,
)

log = logging.getLogger("referral_service.gateway")

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


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The process owner handles SIGTERM/SIGINT and stops us through HttpGateway.stop().
        yield


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, reuse_port=reuse_port, backlog=2048)
    sock.setblocking(False)
    return sock


def loopback_target(grpc_host: str, grpc_port: int) -> str:
    """Where the gateway reaches its own gRPC server."""
    if grpc_host in ("", "0.0.0.0", "*"):  # noqa: S104 (a listening address, not a bind)
        return f"127.0.0.1:{grpc_port}"
    if grpc_host in ("::", "[::]"):
        return f"[::1]:{grpc_port}"
    if ":" in grpc_host and not grpc_host.startswith("["):
        return f"[{grpc_host}]:{grpc_port}"
    return f"{grpc_host}:{grpc_port}"


class HttpGateway:
    """Owns the HTTP socket, the loopback channel and the uvicorn server."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        grpc_target: str,
        max_body_bytes: int,
        timeout_seconds: float,
        cors_origins: list[str],
        docs_enabled: bool,
        gateway_auth: str | None = None,
        client_address_header: str = "x-forwarded-for",
    ) -> None:
        self._gateway_auth = gateway_auth
        self._address_header = client_address_header
        self._sock = sock
        self._target = grpc_target
        self._max_body = max_body_bytes
        self._timeout = timeout_seconds
        self._cors = cors_origins
        self._docs = docs_enabled
        self._routes = build_routes(descriptors.bindings())
        self._openapi = json.dumps(openapi.document(), indent=1).encode() if docs_enabled else b""
        self._assets = load_assets() if docs_enabled else {}
        self._channel: grpc.aio.Channel | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app: Transcoder | None = None

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def host(self) -> str:
        return str(self._sock.getsockname()[0])

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(
            self._target,
            options=[("grpc.max_receive_message_length", 4 * 1024 * 1024)],
        )
        self.app = Transcoder(
            self._channel,
            self._routes,
            max_body_bytes=self._max_body,
            timeout_seconds=self._timeout,
            cors_origins=self._cors,
            extra=[self._extras],
            gateway_auth=self._gateway_auth,
            client_address_header=self._address_header,
        )
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=True,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=None,
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
        if self._channel is not None:
            await self._channel.close()

    # --- what is not an RPC ---------------------------------------------------------------

    async def _extras(self, scope: Scope, receive: Receive, send: Send) -> bool:
        path = scope["path"]
        method = scope["method"].upper()
        if method not in ("GET", "HEAD"):
            return False
        if path == "/healthz":
            assert self._channel is not None
            status, body = await health_check(self._channel, min(self._timeout, 5.0))
            await json_response(status, body).send(send)
            return True
        if not self._docs:
            return False
        if path == "/openapi.json":
            await Response(200, self._openapi, "application/json", {"cache-control": "no-cache"}).send(send)
            return True
        if path in ("/", "/docs/"):
            await Response(307, b"", "text/plain", {"location": "/docs"}).send(send)
            return True
        asset = self._assets.get(path)
        if asset is None:
            return False
        headers = {
            "cache-control": asset.cache,
            "x-content-type-options": "nosniff",
        }
        if path == "/docs":
            headers["content-security-policy"] = _CSP
        await Response(200, asset.body if method == "GET" else b"", asset.content_type, headers).send(send)
        return True


async def health_check(channel: grpc.aio.Channel, deadline: float) -> tuple[int, dict[str, Any]]:
    """``/healthz``: the overall status of the gRPC health service, asked over the loopback
    channel (so it says whether gRPC itself answers)."""
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        response = await check(health_pb2.HealthCheckRequest(service=""), timeout=deadline)
    except grpc.aio.AioRpcError as error:
        return 503, {"status": "NOT_SERVING", "error": error.code().name}
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return (200 if response.status == health_pb2.HealthCheckResponse.SERVING else 503), {"status": name}
