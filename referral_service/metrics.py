"""Prometheus metrics: every metric the service exports, defined once, here.

Both transports count their calls with the conventional gRPC server metrics (the names and
labels of go-grpc-prometheus, plus ``transport``): ``grpc_server_started_total``,
``grpc_server_handled_total`` and the ``grpc_server_handling_seconds`` histogram, recorded by
the request pipeline's metrics stage (``pipeline/metrics.py``). The HTTP gateway adds the HTTP
server metrics of the OpenTelemetry semantic conventions (``http_server_request_duration_seconds``,
``http_server_active_requests``); the adapters add what only they know: look-up cache hits and
misses, rate-limit rejections per limit, the argon2 pool's queue, database pool connections,
circuit breakers, outbound provider calls by outcome, health.

Several worker processes: prometheus_client's multiprocess mode. The supervisor gives the
workers one private directory (``PROMETHEUS_MULTIPROC_DIR``, set before this module is imported),
each process writes its values to memory-mapped files there, and whichever worker answers a
scrape adds up every process's files (``exposition``). Gauges say how they add up
(``multiprocess_mode``): ``livesum`` sums the live processes. prometheus_client's own process and
GC collectors describe one process only, so they are exported with one worker only.

Recording is cheap (a lock and a float add, or a write to the mapped file): the hot paths keep
the labelled children they use instead of looking them up per call.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import values as _values

from referral_service.domain.ports import CacheLookup, KeyValueCache, VersionedCache

# No ``*_created`` series beside every counter and histogram: they double the scrape and nobody
# reads them (multiprocess mode has none anyway).
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Latency buckets (seconds): finer than Prometheus's defaults at the low end, where a cached
#: look-up (well under a millisecond) and a login (tens of milliseconds) live.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# --- gRPC server (both transports) ---------------------------------------------------------------

GRPC_LABELS = ("grpc_service", "grpc_method", "grpc_type", "transport")
GRPC_STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server (gRPC and HTTP/JSON).", GRPC_LABELS
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, whatever their status code.",
    (*GRPC_LABELS, "grpc_code"),
)
GRPC_HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from receiving an RPC to its response, in seconds.",
    GRPC_LABELS,
    buckets=LATENCY_BUCKETS,
)

#: ``google.rpc.Code`` number -> the status name as gRPC's Go library (and so go-grpc-prometheus
#: and its dashboards) writes it.
GRPC_CODE_NAMES = {
    0: "OK",
    1: "Canceled",
    2: "Unknown",
    3: "InvalidArgument",
    4: "DeadlineExceeded",
    5: "NotFound",
    6: "AlreadyExists",
    7: "PermissionDenied",
    8: "ResourceExhausted",
    9: "FailedPrecondition",
    10: "Aborted",
    11: "OutOfRange",
    12: "Unimplemented",
    13: "Internal",
    14: "Unavailable",
    15: "DataLoss",
    16: "Unauthenticated",
}

# --- HTTP server (the gateway) -----------------------------------------------------------------

HTTP_LABELS = ("http_request_method", "http_route", "http_response_status_code")
HTTP_DURATION = Histogram(
    "http_server_request_duration_seconds",
    "HTTP requests by method, route template and status, and how long they took, in seconds.",
    HTTP_LABELS,
    buckets=LATENCY_BUCKETS,
)
HTTP_ACTIVE = Gauge(
    "http_server_active_requests",
    "HTTP requests being served.",
    multiprocess_mode="livesum",
)

# --- what the adapters know --------------------------------------------------------------------

CACHE_LOOKUPS = Counter(
    "referral_cache_lookups_total",
    "Look-ups in a cache, by cache and result (hit or miss).",
    ("cache", "result"),
)
RATE_LIMITED = Counter(
    "referral_rate_limit_rejections_total",
    "Calls refused with RESOURCE_EXHAUSTED, by the limit that refused them.",
    ("limit",),
)
HASH_QUEUE = Gauge(
    "referral_password_hash_queue_depth",
    "Password hashes (argon2id) waiting for a thread of the hashing pool.",
    multiprocess_mode="livesum",
)
HASH_WAIT = Histogram(
    "referral_password_hash_wait_seconds",
    "Time a password hash waited for a thread of the hashing pool, in seconds.",
    buckets=LATENCY_BUCKETS,
)
HASH_DURATION = Histogram(
    "referral_password_hash_duration_seconds",
    "Time a password hash or verification took on its thread, in seconds.",
    buckets=LATENCY_BUCKETS,
)
DB_POOL_CHECKED_OUT = Gauge(
    "referral_db_pool_checked_out_connections",
    "Database connections in use (checked out of the pool), by pool.",
    ("pool",),
    multiprocess_mode="livesum",
)
DB_POOL_MAX = Gauge(
    "referral_db_pool_max_connections",
    "Most database connections the pool may open (pool size + overflow), by pool.",
    ("pool",),
    multiprocess_mode="livesum",
)
BREAKER_OPEN = Gauge(
    "referral_circuit_breaker_open",
    "Processes whose circuit breaker for this dependency is open (0: closed everywhere).",
    ("dependency",),
    multiprocess_mode="livesum",
)
BREAKER_REJECTED = Counter(
    "referral_circuit_breaker_rejected_total",
    "Calls not made to a dependency because its circuit breaker was open.",
    ("dependency",),
)
DEPENDENCY_FAILURES = Counter(
    "referral_dependency_failures_total",
    "Failed calls to a dependency (what its circuit breaker counts).",
    ("dependency",),
)
PROVIDER_REQUESTS = Histogram(
    "referral_provider_request_duration_seconds",
    "Outbound HTTP requests to providers, by provider and outcome, and how long they took.",
    ("provider", "outcome"),
    buckets=LATENCY_BUCKETS,
)
MAIL_MESSAGES = Counter(
    "referral_mail_messages_total",
    "Messages of the mail queue by kind and outcome: sent, skipped (no one to send to), "
    "retry (not sent yet), failed (refused for good or given up).",
    ("kind", "outcome"),
)
HEALTH = Gauge(
    "referral_health_serving",
    "1 when the component is SERVING in every process, 0 when NOT_SERVING in any.",
    ("component",),
    multiprocess_mode="livemin",
)
BUILD_INFO = Gauge(
    "referral_build_info",
    "Always 1; the labels say which version runs.",
    ("version",),
    multiprocess_mode="livemax",
)


def multiprocess() -> bool:
    """Whether values go to the shared directory (several workers)."""
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


def exposition(multiprocess_dir: str | None = None) -> Callable[[], tuple[bytes, str]]:
    """What ``/metrics`` answers: the text exposition of every process's metrics (several
    workers: added up from the shared directory) and its content type."""
    if multiprocess_dir is None:
        registry: CollectorRegistry = REGISTRY
    else:
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]

    def render() -> tuple[bytes, str]:
        return generate_latest(registry), CONTENT_TYPE_LATEST

    return render


def started(version: str) -> None:
    BUILD_INFO.labels(version=version).set(1)


# --- port decorators -------------------------------------------------------------------------


class CountingCache:
    """A ``VersionedCache`` that counts its look-ups' hits and misses under ``name``."""

    def __init__(self, inner: VersionedCache, name: str) -> None:
        self._inner = inner
        self._hit = CACHE_LOOKUPS.labels(cache=name, result="hit")
        self._miss = CACHE_LOOKUPS.labels(cache=name, result="miss")

    async def lookup(self, key: str) -> CacheLookup:
        found = await self._inner.lookup(key)
        (self._hit if found.hit else self._miss).inc()
        return found

    async def fill(self, key: str, stamp: object, value: bytes, ttl_seconds: float) -> None:
        await self._inner.fill(key, stamp, value, ttl_seconds)

    async def invalidate(self, key: str) -> None:
        await self._inner.invalidate(key)


class CountingValues:
    """A ``KeyValueCache`` that counts its reads' hits and misses under ``name``."""

    def __init__(self, inner: KeyValueCache, name: str) -> None:
        self._inner = inner
        self._hit = CACHE_LOOKUPS.labels(cache=name, result="hit")
        self._miss = CACHE_LOOKUPS.labels(cache=name, result="miss")

    async def get(self, key: str) -> bytes | None:
        found = await self._inner.get(key)
        (self._miss if found is None else self._hit).inc()
        return found

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        await self._inner.set(key, value, ttl_seconds)
