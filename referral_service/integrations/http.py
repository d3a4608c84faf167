"""One way to build outbound HTTP clients: explicit timeouts, bounded pools, no redirects (an
API key must never follow a redirect elsewhere), and no environment lookups (proxies, .netrc):
configuration comes from Settings only."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

import httpx

try:
    _VERSION = version("referral-service")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    _VERSION = "0"

USER_AGENT = f"referral-service/{_VERSION}"

# httpx logs every request URL at INFO; our URLs carry an email address (personal data) in the
# query, so keep httpx quiet. Our adapters log what matters without the address or any key.
logging.getLogger("httpx").setLevel(logging.WARNING)


def client(*, connect_timeout: float, read_timeout: float, max_connections: int = 20) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
        ),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
    )


def retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (delta form only), if sensible."""
    value = response.headers.get("retry-after", "")
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 24 * 3600 else None
