"""One way to build outbound HTTP clients: explicit timeouts, bounded pools, no redirects (an
API key must never follow a redirect elsewhere), and no environment lookups (proxies, .netrc):
configuration comes from Settings only. Every request is counted by provider and outcome
(``referral_provider_request_duration_seconds``), and traced when tracing is on (the
composition root hands in ``instrument``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import httpx

from referral_service import metrics

try:
    _VERSION = version("referral-service")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    _VERSION = "0"

USER_AGENT = f"referral-service/{_VERSION}"

# httpx logs every request URL at INFO; our URLs carry an email address (personal data) in the
# query, so keep httpx quiet. Our adapters log what matters without the address or any key.
logging.getLogger("httpx").setLevel(logging.WARNING)


def outcome(status: int) -> str:
    """A response's outcome label: ``success`` (2xx, 3xx), ``rate_limited`` (429),
    ``client_error`` (other 4xx), ``server_error`` (5xx)."""
    if status < 400:
        return "success"
    if status == 429:
        return "rate_limited"
    return "client_error" if status < 500 else "server_error"


class MeteredTransport(httpx.AsyncBaseTransport):
    """Counts and times every request of one provider by outcome: a status class, ``timeout``
    or ``connection_error``."""

    def __init__(self, inner: httpx.AsyncBaseTransport, provider: str) -> None:
        self._inner = inner
        self._provider = provider
        self._series = {
            name: metrics.PROVIDER_REQUESTS.labels(provider=provider, outcome=name)
            for name in (
                "success",
                "rate_limited",
                "client_error",
                "server_error",
                "timeout",
                "connection_error",
            )
        }

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        try:
            response = await self._inner.handle_async_request(request)
        except httpx.TimeoutException:
            self._series["timeout"].observe(time.perf_counter() - started)
            raise
        except httpx.TransportError:
            self._series["connection_error"].observe(time.perf_counter() - started)
            raise
        self._series[outcome(response.status_code)].observe(time.perf_counter() - started)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def client(
    *,
    provider: str,
    connect_timeout: float,
    read_timeout: float,
    max_connections: int = 20,
    instrument: Callable[[httpx.AsyncClient], None] | None = None,
) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    made = httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
        ),
        transport=MeteredTransport(httpx.AsyncHTTPTransport(limits=limits, trust_env=False), provider),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
    )
    if instrument is not None:
        instrument(made)
    return made


def retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (delta form only), if sensible."""
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 24 * 3600 else None
