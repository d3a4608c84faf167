"""A real HTTP/1.1 server on 127.0.0.1 that plays a vendor's API in tests.

Each test gives it a handler (request -> response). It records every request exactly as it
arrived on the wire (request target and headers), so tests can prove what the client sent:
the API key only in a header, the email properly encoded in the query. A response can hang
(``hang=True``) to play a stalled vendor; the connection is closed when the server closes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    #: The request target as sent, e.g. ``/v2/email-verifier?email=a%2Bb%40x.com``.
    target: str
    headers: dict[str, str]
    body: bytes = b""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)

    def param(self, name: str) -> str:
        values = self.query.get(name, [])
        assert len(values) == 1, f"{name!r} sent {len(values)} times in {self.target!r}"
        return values[0]


@dataclass
class Response:
    status: int = 200
    body: Any = None  # dict/list -> JSON; str/bytes -> as is
    headers: dict[str, str] = field(default_factory=dict)
    #: Never answer (until the server closes).
    hang: bool = False


Handler = Callable[[Request], "Response | Awaitable[Response]"]

_REASONS = {200: "OK", 202: "Accepted", 222: "Unknown", 404: "Not Found", 429: "Too Many Requests"}


class FakeHttp:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    async def start(self) -> FakeHttp:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def calls(self, path: str | None = None) -> list[Request]:
        return [r for r in self.requests if path is None or r.path == path]

    async def close(self) -> None:
        self._closed.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or 0)
                received = await reader.readexactly(length) if length else b""
                request = Request(method, target, headers, received)
                self.requests.append(request)
                result = self.handler(request)
                response = await result if asyncio.iscoroutine(result) else result
                assert isinstance(response, Response)
                if response.hang:
                    await self._closed.wait()
                    return
                body = response.body
                if isinstance(body, dict | list):
                    payload = json.dumps(body).encode()
                    content_type = "application/json"
                elif isinstance(body, str):
                    payload, content_type = body.encode(), "application/json"
                elif isinstance(body, bytes):
                    payload, content_type = body, "application/json"
                else:
                    payload, content_type = b"", "application/json"
                reason = _REASONS.get(response.status, "Status")
                out = [f"HTTP/1.1 {response.status} {reason}", f"Content-Type: {content_type}"]
                out += [f"{k}: {v}" for k, v in response.headers.items()]
                out.append(f"Content-Length: {len(payload)}")
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode() + payload)
                await writer.drain()
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()
