"""The ``WebhookSender`` port on httpx: POST, no redirects followed, bounded time, and no
private or loopback targets (SSRF) unless the settings allow them.

The host is resolved before the request and every address it resolves to must be public; the
answer is not pinned for the connection (a DNS rebinding between the check and the connect is
not stopped here: an egress proxy or network policy is the place for that).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import httpx

from referral_service.domain.ports import WebhookResponse
from referral_service.domain.webhooks import forbidden_address, url_violations
from referral_service.integrations.http import client


class HttpWebhookSender:
    def __init__(
        self,
        *,
        allow_private: bool = False,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        instrument: Callable[[httpx.AsyncClient], None] | None = None,
    ) -> None:
        self._allow_private = allow_private
        self._client = client(
            provider="webhooks",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_connections=50,
            instrument=instrument,
        )

    async def _forbidden(self, url: str) -> bool:
        if url_violations("url", url, allow_private=self._allow_private):
            return True
        if self._allow_private:
            return False
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, parts.port or 443, type=socket.SOCK_STREAM
            )
        except OSError:
            return False  # the request fails to connect, and says so
        for info in infos:
            try:
                address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            except ValueError:
                return True
            if forbidden_address(address):
                return True
        return False

    async def post(self, url: str, headers: Mapping[str, str], body: bytes) -> WebhookResponse:
        started = time.perf_counter()

        def elapsed() -> int:
            return int((time.perf_counter() - started) * 1000)

        if await self._forbidden(url):
            return WebhookResponse(0, elapsed(), "forbidden address")
        try:
            response = await self._client.post(url, content=body, headers=dict(headers))
        except httpx.TimeoutException:
            return WebhookResponse(0, elapsed(), "timeout")
        except httpx.HTTPError as error:
            return WebhookResponse(0, elapsed(), f"connect: {type(error).__name__}")
        if 300 <= response.status_code < 400:
            return WebhookResponse(response.status_code, elapsed(), "redirect (not followed)")
        return WebhookResponse(response.status_code, elapsed())

    async def close(self) -> None:
        await self._client.aclose()
