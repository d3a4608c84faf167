"""What the HTTP side answers for operators: health probes and the Prometheus scrape.

- ``/healthz``: the process's overall serving status (200 SERVING, 503 otherwise): readiness,
  as load balancers use it.
- ``/readyz``: the same status and code, with each component's status (the database, Redis,
  the providers) in the body.
- ``/livez``: 200 while the process answers at all, whatever its dependencies: a liveness probe
  that does not restart a healthy process during a database outage.
- ``/metrics``: the Prometheus text exposition, added up over every worker (each worker's pending
  counts flushed first, see ``metrics.py``).

They are served on the HTTP port, and on the metrics port when ``REFERRAL_METRICS_PORT`` is set
(``/metrics`` then only there). Their access lines are logged at DEBUG: probes come every few
seconds and would drown the calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from referral_service.gateway.transcoder import Response, json_response

#: Paths whose access lines are logged at DEBUG.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/livez", "/metrics"})


@dataclass(frozen=True)
class Probes:
    #: The overall serving status (``SERVING``, ``NOT_SERVING``, ...).
    status: Callable[[], str]
    #: Each component's status by name (``database``, ``redis``, ...).
    components: Callable[[], Mapping[str, str]]
    #: The metrics exposition and its content type; None: no ``/metrics`` here.
    metrics: Callable[[], Awaitable[tuple[bytes, str]]] | None = None

    async def respond(self, verb: str, path: str) -> tuple[str, Response] | None:
        """The route label and the response for a probe path, else None."""
        if verb not in ("GET", "HEAD") or path not in QUIET_PATHS:
            return None
        route = f"{verb} {path}"
        if path == "/metrics":
            if self.metrics is None:
                return None
            body, content_type = await self.metrics()
            return route, Response(
                200, body if verb == "GET" else b"", content_type, {"cache-control": "no-store"}
            )
        if path == "/livez":
            return route, json_response(200, {"status": "SERVING"})
        status = self.status()
        code = 200 if status == "SERVING" else 503
        if path == "/healthz":
            return route, json_response(code, {"status": status})
        return route, json_response(code, {"status": status, "components": dict(self.components())})
