"""grpc.health.v1: what it reports (``HealthReporter``) and one change to the servicer: Watch
streams end once the server is shutting down.

grpcio-health-checking's servicer keeps every Watch stream open until the server cancels it, so a
graceful stop would wait the whole grace period for health watchers (load balancers, sidecars) and
then cut them. Here a watcher receives NOT_SERVING and its stream ends with OK, so the graceful
stop waits only for real calls and never has to cancel any."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

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
    """What the health service says, and why: every service NOT_SERVING while the database
    cannot be reached (found by a failing call, then probed with back-off until it answers),
    and the fast stores (Redis) under their own name, from their circuit breaker."""

    def __init__(
        self,
        servicer: GracefulHealthServicer,
        services: Sequence[str],
        database: str,
        fast_stores: str,
    ) -> None:
        self.servicer = servicer
        self._names = ("", *services, database)
        self._fast_stores = fast_stores
        self._ping: Callable[[], Awaitable[bool]] | None = None
        self._database_up = True
        self._probe: asyncio.Task[None] | None = None
        self._stopping = False

    async def serving(self, ping_database: Callable[[], Awaitable[bool]], fast_stores_up: bool) -> None:
        """At start-up: SERVING, and the fast stores as they answered."""
        self._ping = ping_database
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        self.fast_stores_changed(fast_stores_up)

    def fast_stores_changed(self, up: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.get_running_loop().create_task(self.servicer.set(self._fast_stores, status))

    def database_failed(self) -> None:
        """A call found the database unavailable: NOT_SERVING for every service (so load
        balancers move traffic to replicas that can reach it) until a probe gets an answer."""
        if self._stopping or not self._database_up or self._ping is None:
            return
        self._database_up = False
        log.warning("database unavailable: health NOT_SERVING until it answers again")
        self._probe = asyncio.get_running_loop().create_task(self._probe_database(self._ping))

    async def _probe_database(self, ping: Callable[[], Awaitable[bool]]) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        attempt = 0
        while not await ping():
            attempt += 1
            await asyncio.sleep(backoff_delay(attempt, 0.2, 2.0))
        self._database_up = True
        if not self._stopping:
            await self._set_all(health_pb2.HealthCheckResponse.SERVING)
            log.info("database reachable again: health SERVING")

    async def _set_all(self, status: int) -> None:
        for name in self._names:
            await self.servicer.set(name, status)

    async def shutting_down(self) -> None:
        """NOT_SERVING for good; watch streams end."""
        self._stopping = True
        if self._probe is not None:
            self._probe.cancel()
        await self.servicer.enter_graceful_shutdown()
