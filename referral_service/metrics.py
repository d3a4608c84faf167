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

Recording on the hot paths (every call's ``grpc_server_*`` series, the HTTP request metrics, the
cache counters) is a plain integer add: they count in per-process ``Local*`` accumulators
(``LocalCounter``, ``LocalHistogram``, ``LocalGauge``; no lock, the event loop is one thread),
which ``flush()`` adds to prometheus_client's series, the only place the lock, the bucket search
and (several workers) the write to the mapped file happen. The ``Flusher`` of each process flushes
every ``FLUSH_INTERVAL_SECONDS``, at graceful stop and right before the process renders a scrape;
with several workers the scraping worker first asks every other live worker to flush (a datagram
on a Unix socket each worker listens on in the shared directory) and waits for their answers
(at most ``PEER_FLUSH_TIMEOUT_SECONDS``), so a scrape counts every call finished before it
arrived. A worker too busy to answer in time is counted as of its last flush (at most
``FLUSH_INTERVAL_SECONDS`` old); one killed without a graceful stop loses at most that much. The
rest (gauges set from background tasks, the hashing pool's histograms, recorded from its threads)
record straight into prometheus_client.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import socket
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from typing import Any

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


def exposition(
    multiprocess_dir: str | None = None,
) -> Callable[[], Awaitable[tuple[bytes, str]]]:
    """What ``/metrics`` answers: the text exposition of every process's metrics (several
    workers: added up from the shared directory) and its content type. Flushes this process's
    accumulators (and asks the other workers to flush theirs) first, on the event loop; renders
    in a thread."""
    if multiprocess_dir is None:
        registry: CollectorRegistry = REGISTRY
    else:
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]

    async def render() -> tuple[bytes, str]:
        await before_scrape()
        return await asyncio.to_thread(generate_latest, registry), CONTENT_TYPE_LATEST

    return render


def started(version: str) -> None:
    BUILD_INFO.labels(version=version).set(1)


# --- per-process accumulators -----------------------------------------------------------------

log = logging.getLogger(__name__)

#: How often each process adds its accumulators to prometheus_client's series (besides before a
#: scrape and at stop): how stale a scrape may be for a worker too busy to answer its request.
FLUSH_INTERVAL_SECONDS = 1.0
#: How long a scrape waits for the other workers to flush.
PEER_FLUSH_TIMEOUT_SECONDS = 0.5

#: Every accumulator of this process, flushed together, by the ``id`` of its prometheus_client
#: series (one accumulator per series however many chains or apps use it; series are never
#: removed, so an id is never reused).
_accumulators: dict[int, LocalCounter | LocalHistogram] = {}


class LocalCounter:
    """A counter's pending increments, a plain int (``n += 1`` on the hot path, or ``inc()``),
    added to ``child`` (a labelled prometheus_client Counter or Gauge) by ``flush()``. Event-loop
    thread only. Made with ``LocalCounter.of(child)``."""

    __slots__ = ("_child", "n")

    def __init__(self, child: Any) -> None:
        self._child = child
        self.n = 0

    @classmethod
    def of(cls, child: Any) -> LocalCounter:
        found = _accumulators.get(id(child))
        if not isinstance(found, LocalCounter):
            found = _accumulators[id(child)] = cls(child)
        return found

    def inc(self) -> None:
        self.n += 1

    def dec(self) -> None:
        self.n -= 1

    def _flush(self) -> None:
        n = self.n
        if n:
            self.n = 0
            self._child.inc(n)


#: A gauge moved by ``inc()``/``dec()`` (in-flight requests): its pending change, flushed the same
#: way (a scrape sees the change when the counters' flush does).
LocalGauge = LocalCounter


class LocalHistogram:
    """A histogram's pending observations: a count per bucket and the sum, added to ``child`` (a
    labelled prometheus_client Histogram) by ``flush()``. Event-loop thread only. Made with
    ``LocalHistogram.of(child)``."""

    __slots__ = ("_bounds", "_buckets", "_child", "_sum", "counts", "sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        # prometheus_client's histogram: the upper bounds (ending with +Inf), a value per bucket
        # (not cumulative) and the sum; ``observe`` adds 1 to the first bucket whose bound is
        # >= the value, as bisect_left finds it. tests/test_metrics.py pins that a flush gives
        # the series ``observe`` would have.
        self._bounds: tuple[float, ...] = tuple(child._upper_bounds)
        self._buckets: list[Any] = child._buckets
        self._sum: Any = child._sum
        self.counts = [0] * len(self._bounds)
        self.sum = 0.0

    @classmethod
    def of(cls, child: Any) -> LocalHistogram:
        found = _accumulators.get(id(child))
        if not isinstance(found, LocalHistogram):
            found = _accumulators[id(child)] = cls(child)
        return found

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self._bounds, seconds)] += 1
        self.sum += seconds

    def _flush(self) -> None:
        counts = self.counts
        if not any(counts):
            return
        self.counts = [0] * len(counts)
        total, self.sum = self.sum, 0.0
        for bucket, n in zip(self._buckets, counts, strict=True):
            if n:
                bucket.inc(n)
        self._sum.inc(total)


def flush() -> None:
    """Add every pending count of this process to prometheus_client's series (on the event loop
    thread, or when no loop runs: at exit)."""
    for accumulator in list(_accumulators.values()):
        accumulator._flush()


atexit.register(flush)  # a process that ends without a graceful stop of its Flusher


#: The running Flusher of this process (None outside a serving process: a flush at scrape is then
#: a local flush).
_flusher: Flusher | None = None


async def before_scrape() -> None:
    if _flusher is not None:
        await _flusher.flush_everywhere()
    else:
        flush()


class Flusher:
    """Flushes this process's accumulators every ``FLUSH_INTERVAL_SECONDS``; with several workers
    (``multiprocess_dir``) also on request of another worker about to render a scrape: each worker
    listens on ``<dir>/flush-<pid>.sock`` (a Unix datagram socket), and ``flush_everywhere`` sends
    every other one a request and waits for the answers."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self._dir = multiprocess_dir
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self._path = ""
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._serial = 0

    def start(self) -> None:
        global _flusher
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._every_interval())
        if self._dir is not None and hasattr(socket, "AF_UNIX"):
            self._path = os.path.join(self._dir, f"flush-{os.getpid()}.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path)  # a former process's, with our pid
                sock.bind(self._path)
            except OSError:  # no peer flushes: scrapes are then up to an interval stale
                log.warning("cannot listen for metrics flush requests on %s", self._path, exc_info=True)
                sock.close()
            else:
                sock.setblocking(False)
                self._sock = sock
                loop.add_reader(sock.fileno(), self._received)
        _flusher = self

    async def stop(self) -> None:
        """Stop flushing on a timer and on request, and flush what is pending."""
        global _flusher
        if _flusher is self:
            _flusher = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                os.unlink(self._path)
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_result(None)
        flush()

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            flush()

    async def flush_everywhere(self) -> None:
        """Flush here and, with several workers, in every other live worker (waiting at most
        ``PEER_FLUSH_TIMEOUT_SECONDS`` for their answers)."""
        flush()
        sock = self._sock
        if sock is None or self._dir is None:
            return
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[None]] = []
        try:
            names = os.listdir(self._dir)
        except OSError:
            return
        for name in names:
            path = os.path.join(self._dir, name)
            if not (name.startswith("flush-") and name.endswith(".sock")) or path == self._path:
                continue
            self._serial += 1
            token = f"{os.getpid()}.{self._serial}"
            try:
                sock.sendto(b"flush " + token.encode(), path)
            except (ConnectionRefusedError, FileNotFoundError):
                continue  # a worker that stopped without removing its socket (killed): its last flush counts
            except OSError:  # its queue is full, say: count it as of its last flush
                continue
            future: asyncio.Future[None] = loop.create_future()
            self._waiting[token] = future
            waiting.append(future)
        if not waiting:
            return
        try:
            async with asyncio.timeout(PEER_FLUSH_TIMEOUT_SECONDS):
                await asyncio.gather(*waiting)
        except TimeoutError:
            log.debug("a worker did not flush its metrics in time; its counts are as of its last flush")
        finally:
            for future in waiting:
                future.cancel()
            self._waiting = {t: f for t, f in self._waiting.items() if not f.done()}

    def _received(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                data, sender = sock.recvfrom(256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            verb, _, token = data.decode("ascii", "replace").partition(" ")
            if verb == "flush":
                flush()
                if sender:
                    with contextlib.suppress(OSError):
                        sock.sendto(b"done " + token.encode(), sender)
            elif verb == "done":
                future = self._waiting.pop(token, None)
                if future is not None and not future.done():
                    future.set_result(None)


# --- port decorators -------------------------------------------------------------------------


class CountingCache:
    """A ``VersionedCache`` that counts its look-ups' hits and misses under ``name``."""

    def __init__(self, inner: VersionedCache, name: str) -> None:
        self._inner = inner
        self._hit = LocalCounter.of(CACHE_LOOKUPS.labels(cache=name, result="hit"))
        self._miss = LocalCounter.of(CACHE_LOOKUPS.labels(cache=name, result="miss"))

    async def lookup(self, key: str) -> CacheLookup:
        found = await self._inner.lookup(key)
        (self._hit if found.hit else self._miss).n += 1
        return found

    async def fill(self, key: str, stamp: object, value: bytes, ttl_seconds: float) -> None:
        await self._inner.fill(key, stamp, value, ttl_seconds)

    async def invalidate(self, key: str) -> None:
        await self._inner.invalidate(key)


class CountingValues:
    """A ``KeyValueCache`` that counts its reads' hits and misses under ``name``."""

    def __init__(self, inner: KeyValueCache, name: str) -> None:
        self._inner = inner
        self._hit = LocalCounter.of(CACHE_LOOKUPS.labels(cache=name, result="hit"))
        self._miss = LocalCounter.of(CACHE_LOOKUPS.labels(cache=name, result="miss"))

    async def get(self, key: str) -> bytes | None:
        found = await self._inner.get(key)
        (self._miss if found is None else self._hit).n += 1
        return found

    async def set(self, key: str, value: bytes, ttl_seconds: float) -> None:
        await self._inner.set(key, value, ttl_seconds)
