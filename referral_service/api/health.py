"""grpc.health.v1: what it reports (``HealthReporter``) and one change to the servicer: Watch
streams end once the server is shutting down.

grpcio-health-checking's servicer keeps every Watch stream open until the server cancels it, so a
graceful stop would wait the whole grace period for health watchers (load balancers, sidecars) and
then cut them. Here a watcher receives NOT_SERVING and its stream ends with OK, so the graceful
stop waits only for real calls and never has to cancel any."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from referral_service import metrics
from referral_service.domain.backoff import backoff_delay

log = logging.getLogger("referral_service")


class GracefulHealthServicer(HealthServicer):
    def status(self, service: str = "") -> int:
        """The serving status last set for ``service`` (``""``: the server as a whole)."""
        base: Any = self
        return int(base._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN))

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        base: Any = self  # the parent's private state (not in its type stubs)
        condition = base._server_watchers[request.service]
        base._watcher_count_by_service[request.service] += 1
        last_status = None
        try:
            async with condition:
                while True:
                    status = base._server_status.get(
                        request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                    )
                    if status != last_status:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last_status = status
                    if base._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:
            base._watcher_count_by_service[request.service] -= 1
            if base._watcher_count_by_service[request.service] == 0:
                del base._server_watchers[request.service]
                del base._watcher_count_by_service[request.service]


class HealthReporter:
    """What the health service says, and why.

    - The database: every service NOT_SERVING while it cannot be reached. A background probe
      asks it every ``probe_interval`` seconds (``REFERRAL_HEALTH_PROBE_INTERVAL_SECONDS``)
      without waiting for a call to fail, and faster while it is down; a call that finds it
      unavailable turns health NOT_SERVING at once and wakes the probe.
    - Each other component under its own name (``referral-service.redis``, ``.hunter``,
      ``.enrichment``), from its circuit breaker; Redis is probed in the background too (through
      its breaker). They do not change the overall status: the service works without them.

    Every change is logged once and exported as ``referral_health_serving{component}``.
    """

    def __init__(
        self,
        servicer: GracefulHealthServicer,
        services: Sequence[str],
        database: str,
        fast_stores: str,
        probe_interval: float = 2.0,
    ) -> None:
        self.servicer = servicer
        self._names = ("", *services, database)
        #: component -> its health service name
        self._services = {"database": database, "redis": fast_stores}
        self._status: dict[str, int] = {}
        self._interval = probe_interval
        self._ping: Callable[[], Awaitable[str | None]] | None = None
        self._ping_fast: Callable[[], Awaitable[bool]] | None = None
        self._database_up = True
        self._probe: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False

    def add_component(self, component: str, service: str) -> Callable[[bool], None]:
        """Report ``component`` under the health service name ``service``; returns the callback
        its circuit breaker calls on a change (True: up)."""
        self._services[component] = service
        return lambda up: self.component_changed(component, up)

    def components(self) -> dict[str, str]:
        """Each component's status name, for ``/readyz``."""
        return {
            component: health_pb2.HealthCheckResponse.ServingStatus.Name(
                self._status.get(component, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            )
            for component in self._services
        }

    async def serving(
        self,
        ping_database: Callable[[], Awaitable[str | None]],
        fast_stores_up: bool,
        ping_fast_stores: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """At start-up (the database answered): SERVING, the fast stores as they answered, the
        other components SERVING until their breakers say otherwise; then the background probe.
        ``ping_database`` returns None when the database answers, else why not."""
        self._ping = ping_database
        self._ping_fast = ping_fast_stores
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        self._record("database", True)
        for component in self._services:
            if component not in ("database", "redis"):
                await self._set_component(component, True)
        await self._set_component("redis", fast_stores_up)
        self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    def fast_stores_changed(self, up: bool) -> None:
        self.component_changed("redis", up)

    def component_changed(self, component: str, up: bool) -> None:
        if self._stopping:
            return
        asyncio.get_running_loop().create_task(self._set_component(component, up))

    async def _set_component(self, component: str, up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        self._record(component, up)
        await self.servicer.set(self._services[component], status)

    def _record(self, component: str, up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        previous = self._status.get(component)
        self._status[component] = status
        metrics.HEALTH.labels(component=component).set(1 if up else 0)
        if previous is not None and previous != status and component != "database":
            log.log(
                logging.INFO if up else logging.WARNING,
                "health: %s %s",
                component,
                "SERVING again" if up else "NOT_SERVING",
            )

    def database_failed(self) -> None:
        """A call found the database unavailable: NOT_SERVING for every service at once (so load
        balancers move traffic to replicas that can reach it) until a probe gets an answer."""
        if self._stopping or not self._database_up or self._ping is None:
            return
        self._database_down("a call found it unavailable")

    def _database_down(self, reason: str) -> None:
        self._database_up = False
        self._record("database", False)
        log.warning("database unreachable (%s): health NOT_SERVING until it answers again", reason)
        asyncio.get_running_loop().create_task(self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING))
        self._wake.set()

    async def _probe_loop(self) -> None:
        """Ask the database (and Redis) every interval; while the database is down, sooner."""
        assert self._ping is not None
        failures = 0
        while not self._stopping:
            checks: list[Awaitable[object]] = [self._ping()]
            if self._ping_fast is not None:
                checks.append(self._ping_fast())  # reports through its breaker
            problem = (await asyncio.gather(*checks))[0]
            if self._stopping:
                return
            if problem is None:
                failures = 0
                if not self._database_up:
                    self._database_up = True
                    self._record("database", True)
                    await self._set_all(health_pb2.HealthCheckResponse.SERVING)
                    log.info("database reachable again: health SERVING")
            else:
                failures += 1
                if self._database_up:
                    self._database_down(str(problem))
            delay = (
                self._interval
                if self._database_up
                else min(backoff_delay(failures, 0.2, 2.0), self._interval)
            )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _set_all(self, status: int) -> None:
        if self._stopping:
            return
        for name in self._names:
            await self.servicer.set(name, status)

    async def shutting_down(self) -> None:
        """NOT_SERVING for good; watch streams end."""
        self._stopping = True
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.servicer.enter_graceful_shutdown()
